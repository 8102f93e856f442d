"""The study report, tested through the real pipeline: one `run_study` on the demo ladder (neurons, salient
neurons, the ablation check and the weight error at a small --limit) feeds every check of what the report
shows against study.json and against independent recomputations from the run directories; plus what_changed's
rules and the rendering of empty, partial and hand-made studies, and a headless-Chromium screenshot."""

from __future__ import annotations

import base64
import html as htmllib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ggml_probe.pipeline.study import StudyConfig, run_study
from ggml_probe.report.values import slug

SECTION_IDS = ("header", "what-changed", "tables", "pick", "text-kld", "plots", "neurons", "weights", "manifest")
TASK = "boolq"
N_BOOT = 200


# ------------------------------------------------------------------ one real study for the whole module


@pytest.fixture(scope="module")
def real_study(demo_ladder, boolq_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    config = StudyConfig(quants=["F16", "Q4_0"], tasks=[TASK], data={TASK: str(boolq_path)}, limit=8,
                         salient_examples=3, ablate_top=2, n_boot=N_BOOT,
                         noise_floor=False, speed=False)  # test_noise_floor's study covers those
    with pytest.MonkeyPatch.context() as mp:  # the session's ladder files are the study's store
        mp.setenv("GGML_PROBE_MODELS", str(demo_ladder["F16"].parent))
        returned = run_study("demo", config, out)
    return {"dir": out, "returned": returned, "study": json.loads((out / "study.json").read_text(encoding="utf-8")),
            "html": (out / "report.html").read_text(encoding="utf-8"),
            "md": (out / "report.md").read_text(encoding="utf-8"), "ladder": demo_ladder}


def _run_dir(real_study, level: str) -> Path:
    return Path(real_study["study"]["tasks"][TASK]["runs"][level]["run_dir"])


def _shown(text: str, html: str) -> bool:
    """Is this plain text on the page (the page escapes quotes and ampersands)?"""
    return htmllib.escape(text, quote=True) in html


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, sid
    return m.group(1)


# ------------------------------------------------------------------ activation drift


def _independent_drift(ref_npz: Path, lvl_npz: Path, key: str) -> tuple[float, float]:
    """|mean_level − mean_ref| / std_ref per neuron, over neurons whose reference spread is non-zero."""
    ref, lvl = np.load(ref_npz), np.load(lvl_npz)
    std = np.sqrt(ref[f"{key}/var"])
    values = []
    for j in range(std.size):
        if std[j] > 0:
            values.append(abs(float(lvl[f"{key}/mean"][j]) - float(ref[f"{key}/mean"][j])) / float(std[j]))
    return sum(values) / len(values), max(values)


@pytest.mark.slow
def test_drift_numbers_and_definition_agree_everywhere(real_study):
    """The drift the report shows is the one its definition states, recomputed from neuron_stats.npz."""
    study, page, md = real_study["study"], real_study["html"], real_study["md"]
    drift = study["tasks"][TASK]["neuron_comparison"]["Q4_0"]["drift"]
    layers = study["tasks"][TASK]["neurons"]["F16"]["layers"]
    assert layers == [0, 14, 29] and set(drift) == {str(L) for L in layers}
    for layer in layers:
        mean, mx = _independent_drift(_run_dir(real_study, "F16") / "neuron_stats.npz",
                                      _run_dir(real_study, "Q4_0") / "neuron_stats.npz", f"act/{layer}")
        got = drift[str(layer)]
        assert got["mean"] == pytest.approx(mean, rel=1e-9)
        assert got["max"] == pytest.approx(mx, rel=1e-9)
        # the report shows these very numbers (HTML and Markdown)
        for text in (f"{got['mean']:.4g}", f"{got['max']:.4g}"):
            assert text in _section(page, "tables") and text in md, (layer, text)
    # one definition of drift, the same in study.json and in the report's definitions table, and it is the
    # standardised one the numbers above follow
    defs = study["study"]["definitions"]
    drift_terms = [k for k in defs if "drift" in k]
    assert drift_terms == ["neuron_drift"]
    text = defs["neuron_drift"]
    assert "/ std" in text and "reference" in text
    manifest = _section(page, "manifest")
    rows = re.findall(r"<tr><th><span class=\"main\">([^<]*drift[^<]*)</span></th><td><span class=\"main\">([^<]*)",
                      manifest)
    assert rows == [("neuron_drift", htmllib.escape(text, quote=True))]
    assert md.count(text.replace("|", "\\|")) == 1  # Markdown table cells escape the bars
    assert "standardised" not in page.replace(htmllib.escape(text, quote=True), "")  # no second definition


# ------------------------------------------------------------------ paired intervals of the changes


def _ace(conf: np.ndarray, corr: np.ndarray) -> float:
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for part in np.array_split(order, 10):
        if len(part):
            total += abs(corr[part].mean() - conf[part].mean())
    return total / 10


def _ece(conf: np.ndarray, corr: np.ndarray) -> float:
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi) | ((conf == 0) & (b == 0))
        if inside.any():
            total += inside.sum() * abs(corr[inside].mean() - conf[inside].mean())
    return total / len(conf)


def _per_example(pred: pd.DataFrame, scoring: str) -> dict[str, np.ndarray]:
    if scoring == "paper":
        return {"conf": pred["paper_confidence"].to_numpy(float), "corr": pred["paper_correct"].to_numpy(float)}
    probs = pred[[c for c in pred.columns if c.startswith("p_")]].to_numpy(float)
    gold = pred["gold_index"].to_numpy()
    onehot = np.eye(probs.shape[1])[gold]
    return {"conf": pred["confidence"].to_numpy(float), "corr": pred["correct"].to_numpy(float),
            "brier": ((probs - onehot) ** 2).sum(axis=1),
            "nll": -np.log(np.clip(probs[np.arange(len(gold)), gold], 1e-12, 1.0))}


METRICS = {"accuracy": lambda x: x["corr"].mean(), "mean_confidence": lambda x: x["conf"].mean(),
           "ace_paper": lambda x: _ace(x["conf"], x["corr"]), "ece": lambda x: _ece(x["conf"], x["corr"]),
           "brier": lambda x: x["brier"].mean(), "nll": lambda x: x["nll"].mean()}


def _loop_paired(ref: dict, lvl: dict, metric, n_boot: int, seed: int) -> tuple[float, float, float]:
    """The paired bootstrap written out: one index draw per resample, the metric of both levels on it."""
    rng = np.random.default_rng(seed)
    n = len(ref["conf"])
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        deltas.append(metric({k: v[idx] for k, v in lvl.items()}) - metric({k: v[idx] for k, v in ref.items()}))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return metric(lvl) - metric(ref), float(lo), float(hi)


@pytest.mark.slow
def test_paired_deltas_and_what_changed_recomputed_from_predictions(real_study):
    study, page, md = real_study["study"], real_study["html"], real_study["md"]
    comp = study["tasks"][TASK]["comparison"]["levels"]["Q4_0"]
    deltas = comp["paired_deltas"]
    assert deltas["n_boot"] == N_BOOT
    preds = {lvl: pd.read_parquet(_run_dir(real_study, lvl) / "predictions.parquet") for lvl in ("F16", "Q4_0")}
    assert list(preds["F16"]["id"]) == list(preds["Q4_0"]["id"])  # the same examples, so the pairing is real
    runs = study["tasks"][TASK]["runs"]
    for scoring, names in (("label_set", list(METRICS)), ("paper", ["accuracy", "mean_confidence", "ace_paper", "ece"])):
        ref, lvl = _per_example(preds["F16"], scoring), _per_example(preds["Q4_0"], scoring)
        assert sorted(deltas[scoring]) == sorted(names)
        for name in names:
            value, lo, hi = _loop_paired(ref, lvl, METRICS[name], N_BOOT, deltas["seed"])
            got = deltas[scoring][name]
            assert got["value"] == pytest.approx(value, abs=1e-12), (scoring, name)
            assert (got["ci_low"], got["ci_high"]) == pytest.approx((lo, hi), abs=1e-12), (scoring, name)
            # the point value is the difference of the levels' own metrics
            own = runs["Q4_0"]["metrics"][scoring][name]["value"] - runs["F16"]["metrics"][scoring][name]["value"]
            assert got["value"] == pytest.approx(own, abs=1e-12)
    assert comp["accuracy_delta"] == deltas["label_set"]["accuracy"]

    # what changed: every change with an interval carries the comparison's paired interval, and is called
    # significant exactly when that interval excludes 0
    items = study["what_changed"]
    assert items == real_study["returned"]["what_changed"]
    with_ci = [i for i in items if i["ci_low"] is not None]
    assert with_ci, items
    by_metric = {"accuracy_delta": "accuracy", "ace_paper_delta": "ace_paper", "ece_delta": "ece",
                 "brier_delta": "brier", "mean_confidence_delta": "mean_confidence"}
    for item in with_ci:
        if item["metric"] == "text_kld_mean":  # the text KLD's interval: mean ± 2 standard errors
            m = study["kld"]["models"][item["level"]]
            assert (item["ci_low"], item["ci_high"]) == pytest.approx(
                (m["kld_mean"] - 2 * m["kld_mean_se"], m["kld_mean"] + 2 * m["kld_mean_se"]))
            continue
        d = deltas["label_set"][by_metric[item["metric"]]]
        assert (item["value"], item["ci_low"], item["ci_high"]) == (d["value"], d["ci_low"], d["ci_high"])
        assert item["significant"] == (d["ci_low"] > 0 or d["ci_high"] < 0)
        assert "overlap" not in item["text"]
    for item in items:
        assert _shown(item["text"], _section(page, "what-changed")) and item["text"] in md
    # the paired ACE change is in the results table too, and the page warns about ACE's small-sample bias
    ace = deltas["label_set"]["ace_paper"]
    assert f"{ace['value']:+.3f}".replace("-", "−") in _section(page, "tables")
    assert "biased upward" in _section(page, "what-changed") and "biased upward" in md


# ------------------------------------------------------------------ what else the report shows


@pytest.mark.slow
def test_report_shows_the_runs_numbers(real_study):
    study, page, md = real_study["study"], real_study["html"], real_study["md"]
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in page, sid
    figures = ["reliability", "metrics", "dead", "salient", "redundancy", "drift", "jaccard"]
    for name in figures:
        assert f'id="fig-{name}-{TASK}"' in page, name
    assert 'id="fig-weights-rel-rmse"' in page and 'id="fig-weights-sqnr"' in page
    assert 'id="fig-pareto"' in _section(page, "pick")  # size against text KLD, the pick ringed
    # where the error enters: a figure per quantized level (the trace runs in every study by default)
    traced = list((study.get("trace") or {}).get("levels") or {})
    assert traced == ["Q4_0"]
    assert f'id="fig-trace-{slug("Q4_0")}"' in _section(page, "trace")
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == len(figures) + 3 + len(traced)
    for s in srcs:  # each one a real PNG, inline
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page and "<link" not in page
    assert not re.findall(r'(?:src|href)="(?!data:)[^"]*"', page)
    # every section had data, but the two this study turned off (test_noise_floor's study covers them)
    measured = re.sub(r'<section id="(?:noise-floor|speed)">.*?</section>', "", page, flags=re.S)
    assert "not measured in this study" not in measured
    assert "not measured in this study" in _section(page, "noise-floor") and "not measured" in _section(page, "speed")

    # accuracy and agreement from predictions.parquet
    preds = {lvl: pd.read_parquet(_run_dir(real_study, lvl) / "predictions.parquet") for lvl in ("F16", "Q4_0")}
    tables = _section(page, "tables")
    for p in preds.values():
        assert f"{p['correct'].mean():.3f}" in tables
    agree = (preds["F16"]["pred_index"].to_numpy() == preds["Q4_0"]["pred_index"].to_numpy()).mean()
    assert f"{100 * agree:.1f}%" in tables

    # neurons: dead counts and salient sets from the run directories' own files
    for lvl in ("F16", "Q4_0"):
        nj = json.loads((_run_dir(real_study, lvl) / "neurons.json").read_text())
        sal = json.loads((_run_dir(real_study, lvl) / "salient.json").read_text())
        n = study["tasks"][TASK]["neurons"][lvl]
        assert n["dead"] == {str(e["layer"]): len(e["dead_ids"]) for e in nj["layers"] if e["definition"] == "act"}
        assert sal["n_prompts"] == 3 and list(sal["layers"]) == ["29"]
        assert n["salient"] == {"29": len(set(sal["layers"]["29"]["union"]))}
        assert "ablation" in sal["layers"]["29"]
    ids = {lvl: set(study["tasks"][TASK]["neurons"][lvl]["salient_ids"]["29"]) for lvl in ("F16", "Q4_0")}
    jac = len(ids["F16"] & ids["Q4_0"]) / len(ids["F16"] | ids["Q4_0"])
    assert study["tasks"][TASK]["neuron_comparison"]["Q4_0"]["salient_jaccard"]["29"] == pytest.approx(jac)
    assert f"{jac:.2f}" in tables

    # what was attributed, when the study recorded it
    for lvl, n in study["tasks"][TASK]["neurons"].items():
        targets = n.get("salient_targets")
        if targets:
            for piece, count in targets["tokens"].items():
                assert _shown(f"'{piece}' ×{count}", tables), (lvl, piece)

    # Markdown: every level, task and figure, the figures beside it
    for word in ("F16", "Q4_0", TASK):
        assert word in md
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", md)
    assert len(linked) == len(srcs)
    for rel in linked:
        assert (real_study["dir"] / rel).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_text_kld_scores_the_sampled_passages_and_is_shown(real_study, boolq_path):
    """The study's text KLD runs on the sampled BoolQ rows' passages (read here straight from the JSONL by
    the rows the run recorded), in llama-perplexity's chunks, and the report shows its figures."""
    from ggml_probe.engine.model import Vocab
    from ggml_probe.formats.kld_base import KLDBaseReader

    study, page, md = real_study["study"], real_study["html"], real_study["md"]
    kld = study["kld"]
    pred = pd.read_parquet(_run_dir(real_study, "F16") / "predictions.parquet")
    lines = boolq_path.read_text(encoding="utf-8").splitlines()
    passages = list(dict.fromkeys(json.loads(lines[row - 1])["passage"] for row in pred["row"]))
    with Vocab(real_study["ladder"]["F16"]) as vocab:
        tokens = vocab.tokenize("\n\n".join(passages), add_special=True)
    ctx = kld["ctx"]
    chunks = min(8, len(tokens) // ctx)
    assert kld["chunks"] == chunks >= 2 and list(kld["models"]) == ["Q4_0"]
    with KLDBaseReader(Path(kld["base_file"])) as base:  # llama-perplexity's format, over exactly these tokens
        assert np.array_equal(base.header.tokens, tokens[:chunks * ctx])
    m = kld["models"]["Q4_0"]
    assert m["n_tokens"] == chunks * (ctx - 1 - ctx // 2)
    assert 0 < m["kld_mean"] < m["kld_max"] and 0 < m["same_top_p"] < 1
    section = _section(page, "text-kld")
    for value in (f"{m['kld_mean']:.5f}", f"{m['kld_p99']:.4f}", f"{100 * m['same_top_p']:.2f}"):
        assert value in section and value in md
    assert any(item["metric"] == "text_kld_mean" for item in study["what_changed"])


def test_the_study_picks_a_level_from_its_own_figures(real_study):
    """The study's pick: its records are the study's own sizes, text KLD and accuracy changes, and the pick
    and frontier equal test_pick's independent brute force over them; the report and the terminal say it."""
    from test_pick import brute_frontier, brute_objectives, brute_pick

    study, page, md = real_study["study"], real_study["html"], real_study["md"]
    section = study["pick"]
    levels, result = section["levels"], section["result"]
    for lvl, d in levels.items():
        assert d["size_bytes"] == study["levels"][lvl]["size_bytes"]
        if lvl != study["study"]["reference"]:
            assert d["kld_mean"] == study["kld"]["models"][lvl]["kld_mean"]
            acc = study["tasks"][TASK]["comparison"]["levels"][lvl]["accuracy_delta"]
            assert d["accuracy_delta"] == pytest.approx(100 * acc["value"])
    objectives = brute_objectives(levels)
    assert result["objectives"] == objectives
    frontier, dominated = brute_frontier(levels, objectives)
    assert result["frontier"] == frontier
    assert result["pick"] == brute_pick(levels, result["budget"], "size")
    shown = result["pick"] or "none"
    assert f"Pick: {shown}" in _section(page, "pick") or "No level fits" in _section(page, "pick")
    assert "Which level to run" in md


def test_weight_error_matches_independent_dequantization(real_study):
    import gguf
    from gguf.quants import dequantize

    w = real_study["study"]["weights"]["Q4_0"]
    ladder = real_study["ladder"]

    def matrices(path, layer):
        r = gguf.GGUFReader(str(path))
        return {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64) for t in r.tensors
                if t.name.startswith((f"blk.{layer}.ffn_", f"blk.{layer}.attn_")) and len(t.shape) >= 2
                and int(np.prod(t.shape)) > max(t.shape)}

    weights_html = _section(real_study["html"], "weights")
    for layer in (0, 29):
        q, ref = matrices(ladder["Q4_0"], layer), matrices(ladder["F16"], layer)
        assert len(q) == 7  # ffn gate/up/down, attn q/k/v/output
        dd = sum(float(((q[n] - ref[n]) ** 2).sum()) for n in q)
        rr = sum(float((ref[n] ** 2).sum()) for n in q)
        row = next(r for r in w["layers"] if r["layer"] == layer)
        assert row["rel_rmse"] == pytest.approx(np.sqrt(dd / rr), rel=1e-6)
        assert row["sqnr_db"] == pytest.approx(10 * np.log10(rr / dd), rel=1e-6)
        assert f"{row['rel_rmse']:.5f}" in weights_html


@pytest.mark.slow
def test_report_is_the_same_from_study_json(real_study, tmp_path):
    """study.json alone (string layer keys after the JSON round trip) renders the report the study wrote."""
    from ggml_probe.report.render import render_report

    paths = render_report(real_study["study"], tmp_path / "again")
    assert paths["html"].read_text(encoding="utf-8") == real_study["html"]
    assert paths["md"].read_text(encoding="utf-8") == real_study["md"]


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

    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,4000",
                        (real_study["dir"] / "report.html").resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (4000, 1400)
    assert img.std() > 20  # not blank: header band, tables and figures
    assert img[:100].mean() < 120 and img[300:].mean() > 180  # the dark header band: the page is styled


# ------------------------------------------------------------------ what_changed's rules (hand-made comparisons)


def _delta(v, lo, hi):
    return {"value": v, "ci_low": lo, "ci_high": hi}


def _comparison(agreement, changed, n, acc, ace, ece, kl):
    return {"n": n, "agreement": agreement, "flips": {"changed": changed}, "kl_full_mean": kl, "kl_full_p99": 2 * kl,
            "top1_agreement": agreement, "accuracy_delta": _delta(*acc),
            "paired_deltas": {"n_boot": 1000, "seed": 0, "alpha": 0.05,
                              "label_set": {"accuracy": _delta(*acc), "ace_paper": _delta(*ace), "ece": _delta(*ece)}}}


def _hand_made_study():
    # The levels' own ACE intervals overlap everywhere ([0.15, 0.45] and alike); only the paired intervals of
    # the differences decide. Q2_K's ACE change is small but its paired interval excludes 0.
    runs = {lvl: {"metrics": {"label_set": {"ace_paper": _delta(a, 0.15, 0.45), "ece": _delta(a, 0.15, 0.45)}}}
            for lvl, a in (("F16", 0.20), ("Q4_0", 0.22), ("Q2_K", 0.23))}
    return {
        "study": {"reference": "F16"},
        "tasks": {"t": {
            "comparison": {"reference": "F16", "levels": {
                "Q4_0": _comparison(0.675, 13, 40, (-0.025, -0.225, 0.175), (0.02, -0.05, 0.09), (0.02, -0.04, 0.08), 0.43),
                "Q2_K": _comparison(0.9, 4, 40, (-0.05, -0.10, -0.01), (0.03, 0.01, 0.05), (0.03, -0.01, 0.07), 0.05),
            }},
            "runs": runs,
        }},
        "weights": {"Q4_0": {"layers": [{"layer": 0, "rel_rmse": 0.08, "sqnr_db": 21.9},
                                        {"layer": 1, "rel_rmse": 0.11, "sqnr_db": 19.2}]}},
    }


def test_what_changed_judges_by_the_paired_interval():
    from ggml_probe.report.changes import what_changed

    study = _hand_made_study()
    items = what_changed(study, max_items=20)
    assert all(re.search(r"\d", i["text"]) for i in items)
    sig = [i["significant"] for i in items]
    assert sig == sorted(sig, reverse=True)  # every significant item before every other
    assert {(i["metric"], i["level"]) for i in items if i["significant"]} == {
        ("accuracy_delta", "Q2_K"), ("ace_paper_delta", "Q2_K")}
    ace = next(i for i in items if i["metric"] == "ace_paper_delta" and i["level"] == "Q2_K")
    assert (ace["value"], ace["ci_low"], ace["ci_high"]) == (0.03, 0.01, 0.05)
    assert "[+0.010, +0.050]" in ace["text"] and "paired" in ace["text"]
    q4 = next(i for i in items if i["metric"] == "accuracy_delta" and i["level"] == "Q4_0")
    assert q4["text"] == ("Q4_0 changed 13 of 40 answers on t (agreement 67.5%); accuracy −2.5 points "
                          "[−22.5, +17.5] vs F16, not significant.")
    w = next(i for i in items if i["metric"] == "weight_rel_rmse")
    assert "layer 1" in w["text"] and "0.1100" in w["text"] and w["value"] == 0.11
    assert len(what_changed(study, max_items=3)) == 3
    kinds = [i["metric"] for i in what_changed(study, max_items=5)]
    assert len(set(kinds)) == 5  # one of each kind before a kind repeats


def test_the_bias_note_names_the_interval_the_study_recorded():
    """BCa when the runs' summaries record it (calibration_summary's "interval"), percentile for an old study.json;
    the reference's lopsided ACE interval is quoted as the example."""
    from ggml_probe.analysis.calibration import BOOTSTRAP_INTERVAL_DEFINITION, calibration_summary
    from ggml_probe.report.model import BCA_BIAS, PERCENTILE_BIAS, build_report

    def texts(study):
        report = build_report(study)
        what = next(sec for sec in report.sections if sec.id == "what-changed")
        return " ".join(str(payload) for kind, payload in what.blocks if kind == "p"), str(report.sections)

    study = _hand_made_study()
    ref_metrics = study["tasks"]["t"]["runs"]["F16"]["metrics"]["label_set"]
    ref_metrics["ace_paper"] = _delta(0.20, 0.05, 0.22)  # lopsided: middle 0.135, a quarter of the width 0.0425
    old_note, _ = texts(study)
    assert PERCENTILE_BIAS in old_note and BCA_BIAS not in old_note
    assert "F16's ACE on t is 0.200 with interval [0.050, 0.220]" in old_note
    recorded = calibration_summary(np.array([[0.9, 0.1], [0.3, 0.7]]), np.array([0, 1]), n_boot=10)["interval"]
    assert recorded == BOOTSTRAP_INTERVAL_DEFINITION and "BCa" in recorded
    ref_metrics["interval"] = recorded
    new_note, everything = texts(study)
    assert BCA_BIAS in new_note and PERCENTILE_BIAS not in new_note and "biased upward" in new_note
    assert recorded in everything  # the definitions list carries the recorded definition
    ref_metrics["ace_paper"] = _delta(0.20, 0.12, 0.30)  # centred within a quarter of the width: no example
    assert "F16's ACE" not in texts(study)[0]


def test_what_changed_without_paired_deltas_claims_nothing():
    """A comparison without paired intervals (an old study.json) states the changes, never a verdict."""
    from ggml_probe.report.changes import what_changed

    study = _hand_made_study()
    for c in study["tasks"]["t"]["comparison"]["levels"].values():
        del c["paired_deltas"]
    items = [i for i in what_changed(study, max_items=20) if i["metric"] in ("ace_paper_delta", "ece_delta")]
    assert items == []


# ------------------------------------------------------------------ rendering without data, and a partial study


def test_render_empty_and_partial_study(tmp_path):
    from ggml_probe.report.model import NOT_MEASURED
    from ggml_probe.report.render import render_report

    paths = render_report({}, tmp_path / "empty")
    page = paths["html"].read_text()
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in page
    assert page.count(NOT_MEASURED) >= 4
    assert "<img" not in page
    partial = {"study": {"model": "m", "quants": ["F16", "Q4_0"], "reference": "F16", "tasks": ["t"], "mode": "paper"},
               "tasks": {"t": {"data": {"examples": 3, "source": "x", "fallback_from": "boolq"},
                               "runs": {"F16": {"metrics": {"paper": {"accuracy": _delta(0.5, 0.2, 0.8)}}}}}}}
    paths = render_report(partial, tmp_path / "partial")
    page = paths["html"].read_text()
    assert "mode: <b>paper</b>" in page and "could not be reached" in page and "boolq" in page
    assert page.count("<img") == 1  # the metric bars; no reliability bins, neurons or weights given
    assert "0.500" in page
    md = paths["md"].read_text()
    assert "F16" in md and "Q4_0" in md and NOT_MEASURED in md


def test_attributed_tokens_are_shown_beside_the_salient_neurons(tmp_path):
    from ggml_probe.report.render import render_report

    targets = {"kind": "label", "tokens": {" True": 12, " False": 8}, "not_label": 0, "n": 20}
    paper = {"kind": "answer", "tokens": {"<|im_end|>": 19, "\n": 1}, "not_label": 20, "n": 20}
    study = {"study": {"model": "m", "quants": ["F16", "Q4_0"], "reference": "F16", "tasks": ["t"]},
             "tasks": {"t": {"runs": {"F16": {"metrics": {}}, "Q4_0": {"metrics": {}}},
                             "neurons": {"F16": {"neuron": "act", "tau": 0.1, "salient": {"29": 3},
                                                 "salient_targets": targets},
                                         "Q4_0": {"neuron": "act", "tau": 0.1, "salient": {"29": 2},
                                                  "salient_targets": paper}}}}}
    paths = render_report(study, tmp_path / "r")
    page, md = paths["html"].read_text(), paths["md"].read_text()
    for text in ("' True' ×12, ' False' ×8", "0 of 20 not a label", "'<|im_end|>' ×19, '⏎' ×1", "20 of 20 not a label"):
        assert _shown(text, page), text
        assert text.replace("|", "\\|") in md, text
