"""The study report: section builders against independent computations, what_changed, rendering of a
study built from real llama.cpp runs of the demo ladder, and a headless-Chromium screenshot."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ggml_probe.analysis.neurons import NeuronAccumulator
from ggml_probe.report.study_report import (
    NOT_MEASURED,
    neuron_comparison,
    neurons_section,
    render_report,
    what_changed,
)

SECTION_IDS = ("header", "what-changed", "tables", "plots", "neurons", "weights", "manifest")


class _Layout:
    def __init__(self, n_rows: int, prompt: int = 0) -> None:
        self.row_prompt = np.full(n_rows, prompt, dtype=np.int64)
        self.row_pos = np.arange(n_rows, dtype=np.int64)


def _accumulator(values_by_layer: dict[int, np.ndarray]) -> NeuronAccumulator:
    layers = sorted(values_by_layer)
    n_ff = values_by_layer[layers[0]].shape[1]
    acc = NeuronAccumulator(layers, ["act"], n_ff, redundancy=True, top_k=3)
    for layer, x in values_by_layer.items():
        half = len(x) // 2  # two batches, so streaming merges are exercised
        acc.update(layer, "act", x[:half], _Layout(half, 0))
        acc.update(layer, "act", x[half:], _Layout(len(x) - half, 1))
    return acc


def _pooled_hist(corrs: list[np.ndarray]) -> np.ndarray:
    out = np.zeros(10, dtype=np.int64)
    for c in corrs:
        iu = np.triu_indices_from(c, k=1)
        v = np.abs(c[iu])
        out += np.bincount(np.minimum((v * 10).astype(int), 9), minlength=10)
    return out


# ------------------------------------------------------------------ section builders (pure NumPy)


def test_neurons_section_matches_numpy():
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(40, 12))
    x0[:, 3] *= 0.01  # dead at tau 0.1
    x0[:, 5] = 0.05 * np.sin(np.arange(40))  # dead
    x0[:, 7] = 2 * x0[:, 6] + 0.001 * rng.normal(size=40)  # a redundant pair
    x1 = rng.normal(size=(40, 12))
    acc = _accumulator({0: x0, 5: x1})
    sec = neurons_section(acc, "act", 0.1, salient={5: [4, 2, 4]}, salient_method="test")

    assert sec["dead"] == {0: int((np.abs(x0).max(axis=0) < 0.1).sum()), 5: int((np.abs(x1).max(axis=0) < 0.1).sum())}
    assert sec["dead"][0] == 2
    expected_hist = _pooled_hist([np.corrcoef(x0, rowvar=False), np.corrcoef(x1, rowvar=False)])
    assert sec["redundancy_hist"] == expected_hist.tolist()
    c0 = np.abs(np.corrcoef(x0, rowvar=False))[np.triu_indices(12, 1)]
    assert sec["redundant_pairs"][0] == int((c0 >= 0.9).sum()) >= 1
    assert sec["salient"] == {5: 2}  # distinct ids
    q = np.quantile(np.abs(x1).max(axis=0), [0, 0.1, 0.5, 0.9, 1])
    np.testing.assert_allclose(sec["max_abs_quantiles"][5], q)
    assert sec["n_ff"] == 12 and sec["tokens"][0] == 40


def test_neuron_comparison_drift_and_jaccard():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(60, 8))
    shifted = ref + np.linspace(0, 0.7, 8)  # neuron j's mean moves by j*0.1
    shifted[:, 0] *= 0.0  # neuron 0 becomes dead in the level
    r, q = _accumulator({3: ref}), _accumulator({3: shifted})
    out = neuron_comparison(r, q, "act", 0.1, reference_salient={3: [1, 2, 3]}, level_salient={3: [2, 3, 4, 5]})
    expected = np.abs(shifted.mean(0) - ref.mean(0)) / ref.std(0)
    assert out["drift"][3]["mean"] == pytest.approx(expected.mean(), rel=1e-9)
    assert out["drift"][3]["max"] == pytest.approx(expected.max(), rel=1e-9)
    assert out["salient_jaccard"][3] == pytest.approx(2 / 5)
    assert out["dead_jaccard"][3] == 0.0  # ref has none dead, the level has neuron 0: union 1, overlap 0


# ------------------------------------------------------------------ what_changed (pure)


def _comparison(agreement, changed, n, acc, lo, hi, kl):
    return {"n": n, "agreement": agreement, "flips": {"changed": changed}, "kl_full_mean": kl, "kl_full_p99": 2 * kl,
            "top1_agreement": agreement, "accuracy_delta": {"value": acc, "ci_low": lo, "ci_high": hi}}


def _metric(v, lo, hi):
    return {"value": v, "ci_low": lo, "ci_high": hi}


def test_what_changed_ranks_significance_first_and_states_numbers():
    study = {
        "study": {"reference": "F16"},
        "tasks": {"t": {
            "comparison": {"reference": "F16", "levels": {
                "Q4_0": _comparison(0.675, 13, 40, -0.025, -0.225, 0.175, 0.43),
                "Q2_K": _comparison(0.9, 4, 40, -0.05, -0.10, -0.01, 0.05),  # small but significant
            }},
            "runs": {lvl: {"metrics": {"label_set": {"ace_paper": _metric(a, a - 0.05, a + 0.05), "ece": _metric(a, a - 0.05, a + 0.05)}}}
                     for lvl, a in (("F16", 0.20), ("Q4_0", 0.22), ("Q2_K", 0.40))},
        }},
        "weights": {"Q4_0": {"layers": [{"layer": 0, "rel_rmse": 0.08, "sqnr_db": 21.9}, {"layer": 1, "rel_rmse": 0.11, "sqnr_db": 19.2}]}},
    }
    items = what_changed(study, max_items=20)
    assert all(re.search(r"\d", i["text"]) for i in items)
    sig = [i["significant"] for i in items]
    assert sig == sorted(sig, reverse=True)  # every significant item before every other
    first = items[0]
    # Q2_K's accuracy CI excludes 0; its ACE/ECE intervals [0.35,0.45] vs [0.15,0.25] do not overlap
    assert {(i["metric"], i["level"]) for i in items if i["significant"]} == {
        ("accuracy_delta", "Q2_K"), ("ace_paper_delta", "Q2_K"), ("ece_delta", "Q2_K")}
    assert first["significant"]
    q4 = next(i for i in items if i["metric"] == "accuracy_delta" and i["level"] == "Q4_0")
    assert q4["text"] == ("Q4_0 changed 13 of 40 answers on t (agreement 67.5%); accuracy −2.5 points "
                          "[−22.5, +17.5] vs F16, not significant.")
    w = next(i for i in items if i["metric"] == "weight_rel_rmse")
    assert "layer 1" in w["text"] and "0.1100" in w["text"] and w["value"] == 0.11
    assert len(what_changed(study, max_items=3)) == 3
    # one of each kind before a kind repeats
    kinds = [i["metric"] for i in what_changed(study, max_items=5)]
    assert len(set(kinds)) == 5


# ------------------------------------------------------------------ rendering without data


def test_render_empty_and_partial_study(tmp_path):
    paths = render_report({}, tmp_path / "empty")
    html = paths["html"].read_text()
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in html
    assert html.count(NOT_MEASURED) >= 4
    assert "<img" not in html
    partial = {"study": {"model": "m", "quants": ["F16", "Q4_0"], "reference": "F16", "tasks": ["t"], "mode": "paper"},
               "tasks": {"t": {"data": {"examples": 3, "source": "x", "fallback_from": "boolq"},
                               "runs": {"F16": {"metrics": {"paper": {"accuracy": _metric(0.5, 0.2, 0.8)}}}}}}}
    paths = render_report(partial, tmp_path / "partial")
    html = paths["html"].read_text()
    assert "mode: <b>paper</b>" in html and "could not be reached" in html and "boolq" in html
    assert html.count("<img") == 1  # the metric bars; no reliability bins, neurons or weights given
    assert "0.500" in html
    md = paths["md"].read_text()
    assert "F16" in md and "Q4_0" in md and NOT_MEASURED in md


# ------------------------------------------------------------------ a study from real runs


@pytest.fixture(scope="module")
def real_study(tmp_path_factory):
    import report_study

    from ggml_probe.errors import ProbeError
    from ggml_probe.models.quantize import quantize_ladder
    from ggml_probe.models.store import demo_model_path

    try:
        demo = demo_model_path()
    except ProbeError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("report")
    results = quantize_ladder(demo, ["F16", "Q4_0"], out_dir=root / "models", allow_requantize=True)
    ladder = {r.quant: r.path for r in results}
    study = report_study.build_study(ladder, root, task="yesno-mini", limit=6, layers=(0, -1), ig_points=8)
    return {"study": study, "ladder": ladder, "root": root}


@pytest.mark.slow
def test_weights_section_matches_independent_dequantization(real_study):
    import gguf
    from gguf.quants import dequantize

    w = real_study["study"]["weights"]["Q4_0"]
    ladder = real_study["ladder"]

    def tensors(path):
        r = gguf.GGUFReader(str(path))
        return {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64) for t in r.tensors
                if t.name.startswith(("blk.0.ffn_", "blk.29.ffn_")) and "norm" not in t.name}

    q, ref = tensors(ladder["Q4_0"]), tensors(ladder["F16"])
    assert len(q) == 6
    for layer in (0, 29):
        names = [n for n in q if n.startswith(f"blk.{layer}.")]
        dd = sum(float(((q[n] - ref[n]) ** 2).sum()) for n in names)
        rr = sum(float((ref[n] ** 2).sum()) for n in names)
        row = next(r for r in w["layers"] if r["layer"] == layer)
        assert row["rel_rmse"] == pytest.approx(np.sqrt(dd / rr), rel=1e-6)
        assert row["sqnr_db"] == pytest.approx(10 * np.log10(rr / dd), rel=1e-6)
        assert row["max_abs"] == pytest.approx(max(np.abs(q[n] - ref[n]).max() for n in names), rel=1e-6)
    dd = sum(float(((q[n] - ref[n]) ** 2).sum()) for n in q)
    rr = sum(float((ref[n] ** 2).sum()) for n in q)
    assert w["total"]["rel_rmse"] == pytest.approx(np.sqrt(dd / rr), rel=1e-6)
    assert w["worst_tensors"][0]["rel_rmse"] == max(t["rel_rmse"] for t in w["worst_tensors"])


def _img_sources(html: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)


@pytest.mark.slow
def test_report_from_real_runs(real_study, tmp_path):
    import pandas as pd

    study = real_study["study"]
    paths = render_report(study, tmp_path / "out")
    html = paths["html"].read_text(encoding="utf-8")
    md = paths["md"].read_text(encoding="utf-8")

    for sid in SECTION_IDS:
        assert f'id="{sid}"' in html, sid
    figures = ["reliability", "metrics", "dead", "salient", "redundancy", "drift", "jaccard"]
    for name in figures:
        assert f'id="fig-{name}-yesno-mini"' in html, name
    assert 'id="fig-weights-rel-rmse"' in html and 'id="fig-weights-sqnr"' in html
    srcs = _img_sources(html)
    assert len(srcs) == len(figures) + 2
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:  # each one a real PNG
        import base64

        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # ladder, metrics, max|a| quantiles, weights + top-token tables (both levels) + manifest tables
    assert html.count("<table") >= 5 + 2
    assert html.count("<details") == 1 and '<section id="manifest"' in html
    # self-contained: no scripts, no stylesheets or images from elsewhere
    assert "<script" not in html and "<link" not in html
    assert not re.findall(r'(?:src|href)="(?!data:)[^"]*"', html)
    assert NOT_MEASURED not in html  # every section had data

    # the numbers shown are the runs' own: recompute accuracy and agreement from predictions.parquet
    runs = study["tasks"]["yesno-mini"]["runs"]
    preds = {lvl: pd.read_parquet(Path(r["run_dir"]) / "predictions.parquet") for lvl, r in runs.items()}
    for lvl, p in preds.items():
        assert f"{p['correct'].mean():.3f}" in html
    agree = (preds["F16"]["pred_index"].to_numpy() == preds["Q4_0"]["pred_index"].to_numpy()).mean()
    assert f"{100 * agree:.1f}%" in html
    for item in study["what_changed"]:
        assert item["text"].replace("'", "&#x27;") in html
    sec = study["tasks"]["yesno-mini"]["neurons"]["F16"]
    assert sec["layers"] == [0, 29] and sec["salient"][29] >= 1 and 0.99 * 1536 * 1535 < sum(sec["redundancy_hist"]) <= 1536 * 1535

    # Markdown: every level and task, figures beside it
    for word in ("F16", "Q4_0", "yesno-mini"):
        assert word in md
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", md)
    assert len(linked) == len(srcs)
    for rel in linked:
        assert (tmp_path / "out" / rel).read_bytes()[:4] == b"\x89PNG"
    assert md.count("\n| ") > 10

    # a JSON round trip (string layer keys) renders the same figures and tables
    again = render_report(json.loads(json.dumps(study)), tmp_path / "again")
    html2 = again["html"].read_text(encoding="utf-8")
    assert len(_img_sources(html2)) == len(srcs) and html2.count("<table") == html.count("<table")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(real_study, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian package: chromium)")
    from PIL import Image

    paths = render_report(real_study["study"], tmp_path / "out")
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,4000",
                        paths["html"].resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    assert shot.exists()
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (4000, 1400)
    assert img.std() > 20  # not blank: header band, tables and figures
    # the dark header band is drawn (the page is styled, not raw text)
    assert img[:100].mean() < 120 and img[300:].mean() > 180
