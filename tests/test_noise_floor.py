"""The noise floor (pipeline/noise_floor.py, analysis/noise_floor.py) and the study's speed table, through the
real pipeline: a deterministic rerun of the reference has a floor of exactly zero; one real `ggml-probe study`
on the demo ladder (BoolQ, neurons, text KLD, floor, speed) feeds checks of every floor metric against an
independent NumPy computation from the perturbed runs' saved outputs, of what-changed's "within the noise
floor" wording, and of the terminal, Markdown and HTML outputs."""

from __future__ import annotations

import copy
import html as htmllib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ggml_probe.analysis.noise_floor import effects, noise_floor, within_floor
from ggml_probe.cli import cli
from ggml_probe.pipeline.compare import compare_runs
from ggml_probe.pipeline.evaluation import EvalConfig, evaluate
from ggml_probe.report.changes import FLOOR_OF, what_changed

TASK = "boolq"


def test_the_floor_of_a_deterministic_rerun_is_exactly_zero(demo_ladder, tmp_path):
    """The reference run twice with identical settings: every floor metric is 0, not merely small."""
    config = EvalConfig(task="yesno-mini", limit=6, n_boot=50)
    a = evaluate(demo_ladder["F16"], config, tmp_path / "a", quant_label="F16")
    b = evaluate(demo_ladder["F16"], config, tmp_path / "b", quant_label="F16")
    values = effects(compare_runs(a.run_dir, b.run_dir, n_boot=50))
    assert {"flips", "kl_label_mean", "kl_full_mean", "ace_paper_delta", "accuracy_delta"} <= set(values)
    assert all(v == 0.0 for v in values.values()), values
    floor = noise_floor({"rerun": values})
    assert all(f["value"] == 0.0 and f["by"] == "rerun" for f in floor.values())


def test_the_floor_is_the_largest_effect_and_within_compares_magnitudes():
    floor = noise_floor({"batch": {"flips": 2.0, "kl_full_mean": 0.001},
                         "flash_attn": {"flips": 1.0, "kl_full_mean": 0.004}})
    assert floor == {"flips": {"value": 2.0, "by": "batch"}, "kl_full_mean": {"value": 0.004, "by": "flash_attn"}}
    assert within_floor(2, floor["flips"]) and not within_floor(3, floor["flips"])
    assert within_floor(-0.004, floor["kl_full_mean"]) and within_floor(None, floor["flips"]) is None


# ------------------------------------------------------------------ one real study


@pytest.fixture(scope="module")
def floor_study(demo_ladder, boolq_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("floor-study")
    args = ["study", "demo", "--quants", "F16,Q4_0", "--task", TASK, "--data", str(boolq_path), "--limit", "8",
            "--salient-examples", "2", "--ablate-top", "1", "--no-weights", "--kld-ctx", "128", "--kld-chunks", "4",
            "--speed", "32,8,2", "--threads", "1", "-o", str(out)]
    with pytest.MonkeyPatch.context() as mp:  # the session's ladder files are the study's store
        mp.setenv("GGML_PROBE_MODELS", str(demo_ladder["F16"].parent))
        mp.setenv("COLUMNS", "250")
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        rerun = CliRunner().invoke(cli, args)
        assert rerun.exit_code == 0, rerun.output
    return {"dir": out, "output": res.output, "rerun_output": rerun.output,
            "study": json.loads((out / "study.json").read_text(encoding="utf-8")),
            "html": (out / "report.html").read_text(encoding="utf-8"),
            "md": (out / "report.md").read_text(encoding="utf-8")}


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, sid
    return m.group(1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def _independent_effects(ref_dir: Path, run_dir: Path, neurons: bool = True) -> dict[str, float]:
    """Flips, label KL, full KL and the accuracy change straight from the saved predictions and logits;
    dead counts from each run's neurons.json."""
    a, b = pd.read_parquet(ref_dir / "predictions.parquet"), pd.read_parquet(run_dir / "predictions.parquet")
    labels = [c for c in a.columns if c.startswith("p_")]
    pa, pb = a[labels].to_numpy(np.float64), b[labels].to_numpy(np.float64)
    la, lb = _log_softmax(np.load(ref_dir / "logits.npy")), _log_softmax(np.load(run_dir / "logits.npy"))
    out = {"flips": float(np.sum(a["pred_index"].to_numpy() != b["pred_index"].to_numpy())),
           "kl_label_mean": float(np.mean(np.sum(pa * (np.log(pa) - np.log(pb)), axis=1))),
           "kl_full_mean": float(np.mean(np.sum(np.exp(la) * (la - lb), axis=1))),
           "accuracy_delta": abs(float(b["correct"].mean() - a["correct"].mean()))}
    if not neurons:
        return out
    na, nb = (json.loads((d / "neurons.json").read_text()) for d in (ref_dir, run_dir))
    dead_a = {(e["definition"], e["layer"]): e["dead"] for e in na["layers"]}
    out["dead_count_delta"] = float(max(abs(e["dead"] - dead_a[(e["definition"], e["layer"])]) for e in nb["layers"]
                                        if e["definition"] == "act"))
    return out


@pytest.mark.slow
def test_floor_metrics_equal_an_independent_computation(floor_study):
    study = study_ = floor_study["study"]
    floor = study["noise_floor"]
    ref = study["study"]["reference"]
    t = floor["tasks"][TASK]
    assert set(t["runs"]) == {"batch", "flash_attn", "threads"}
    ref_dir = Path(study_["tasks"][TASK]["runs"][ref]["run_dir"])
    mine = {}
    for name, run_dir in t["runs"].items():
        run_dir = Path(run_dir)
        assert run_dir.is_relative_to(floor_study["dir"] / "noise_floor")
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["model"]["sha256"] == study["levels"][ref]["sha256"]
        mine[name] = _independent_effects(ref_dir, run_dir)
        for metric, v in mine[name].items():
            assert t["effects"][name][metric] == pytest.approx(v, rel=1e-5, abs=1e-9), (name, metric)
    # each perturbation really changed the pass's settings
    configs = {n: json.loads((Path(d) / "manifest.json").read_text())["config"] for n, d in t["runs"].items()}
    # the batch layout changes from the study's own: packed 4 per decode when it decodes one at a time, else 1
    study_batch = json.loads((ref_dir / "manifest.json").read_text())["config"]["batch_prompts"]
    assert configs["batch"]["batch_prompts"] == (4 if study_batch == 1 else 1) != study_batch
    assert configs["flash_attn"]["flash_attn"] is True
    assert configs["threads"]["threads"] >= 1
    # the perturbed passes capture what the floor compares (dead sets), not the redundancy correlations
    assert all(c["neurons"]["redundancy"] is False for c in configs.values())
    for metric in mine["batch"]:
        best = max(mine, key=lambda n: mine[n][metric])
        assert t["floor"][metric]["value"] == pytest.approx(mine[best][metric], rel=1e-5, abs=1e-9)
    # flash attention moves the logits on CPU (engine.model): the floor is not trivially zero
    assert t["floor"]["kl_full_mean"]["value"] > 0
    # the text KLD of the reference scored against its own base under each change
    text = floor["text_kld"]
    assert set(text["effects"]) == {"batch", "flash_attn", "threads"}
    assert all(0 <= e["text_kld_mean"] for e in text["effects"].values())


@pytest.mark.slow
def test_what_changed_says_within_the_floor_exactly_when_an_effect_is_no_larger(floor_study):
    study = floor_study["study"]
    ref = study["study"]["reference"]
    checked = 0
    for item in study["what_changed"]:
        if item["metric"] not in FLOOR_OF or item.get("within_noise_floor") is None:
            continue
        effect = FLOOR_OF[item["metric"]][1](item)
        assert item["within_noise_floor"] == (abs(effect) <= item["noise_floor"])
        assert ("within the noise floor" in item["text"]) == item["within_noise_floor"]
        checked += 1
    assert checked
    # The same real study with the floor moved to just above / just below each level's flips.
    c = study["tasks"][TASK]["comparison"]["levels"]["Q4_0"]
    flips = c["flips"]["changed"]
    for floor_flips, inside in ((flips, True), (flips - 0.5, False)):
        moved = copy.deepcopy(study)
        moved["noise_floor"]["tasks"][TASK]["floor"]["flips"] = {"value": floor_flips, "by": "batch"}
        del moved["noise_floor"]["tasks"][TASK]["levels"]  # the reference's floor alone
        item = next(i for i in what_changed(moved, max_items=50) if i["metric"] == "accuracy_delta")
        assert item["within_noise_floor"] is inside
        phrase = f"within the noise floor ({floor_flips:.0f} flip"
        assert (phrase in item["text"]) is inside, item["text"]
        if inside:
            assert f"between batch layouts of {ref})" in item["text"]
    moved = copy.deepcopy(study)
    del moved["noise_floor"]
    assert not any("noise floor" in i["text"] for i in what_changed(moved, max_items=50))


@pytest.mark.slow
def test_every_level_is_measured_against_itself_between_batch_layouts(floor_study):
    study = floor_study["study"]
    ref = study["study"]["reference"]
    t = study["noise_floor"]["tasks"][TASK]
    assert set(t["levels"]) == set(study["levels"]) - {ref}
    for level, own in t["levels"].items():
        level_dir, run_dir = Path(study["tasks"][TASK]["runs"][level]["run_dir"]), Path(own["run"])
        config = json.loads((run_dir / "manifest.json").read_text())["config"]
        study_batch = json.loads((level_dir / "manifest.json").read_text())["config"]["batch_prompts"]
        assert config["batch_prompts"] == (4 if study_batch == 1 else 1) and config["neurons"] is None
        mine = _independent_effects(level_dir, run_dir, neurons=False)
        for metric, v in mine.items():
            assert own["effects"][metric] == pytest.approx(v, rel=1e-5, abs=1e-9), (level, metric)
    # a change is judged against the larger of the reference's floor and its level's own layout noise
    level = next(iter(t["levels"]))
    item = next(i for i in what_changed(study, max_items=50) if i["metric"] == "kl_full_mean" and i["level"] == level)
    own_kl, ref_kl = t["levels"][level]["effects"]["kl_full_mean"], t["floor"]["kl_full_mean"]["value"]
    assert item["noise_floor"] == pytest.approx(max(own_kl, ref_kl))
    moved = copy.deepcopy(study)
    moved["noise_floor"]["tasks"][TASK]["levels"][level]["effects"]["kl_full_mean"] = item["value"] * 2
    item = next(i for i in what_changed(moved, max_items=50) if i["metric"] == "kl_full_mean" and i["level"] == level)
    assert item["within_noise_floor"] and f"between batch layouts of {level})" in item["text"]
    own = t["levels"][level]["effects"]
    assert (f"noise floor · {TASK} · each level vs itself between batch layouts: {level} {own['flips']:.0f} flips, "
            f"KL full {own['kl_full_mean']:.2g}") in floor_study["output"]
    assert "own run under the other batch layout" in _section(floor_study["html"], "noise-floor")


@pytest.mark.slow
def test_study_shows_the_floor_and_the_speed_everywhere_and_reuses_them(floor_study):
    study, out, page, md = floor_study["study"], floor_study["output"], floor_study["html"], floor_study["md"]
    floor = study["noise_floor"]["tasks"][TASK]["floor"]
    line = f"noise floor · {TASK} · F16 vs itself: flips {floor['flips']['value']:.0f} ({floor['flips']['by']})"
    assert line in out and line in floor_study["rerun_output"]
    section = _section(page, "noise-floor")
    for metric in ("flips", "kl_full_mean", "ace_paper_delta"):
        assert metric in section and metric in md
    assert f"{floor['kl_full_mean']['value']:.3g}" in section
    speed = study["speed"]
    assert set(speed["levels"]) == {"F16", "Q4_0"}
    assert speed["settings"]["n_prompt"] == 32 and speed["settings"]["n_gen"] == 8 and speed["settings"]["reps"] == 2
    speed_html = _section(page, "speed")
    for lvl, d in speed["levels"].items():
        assert len(d["tests"]["pp32"]["rates"]) == 2 and d["pp_tokens_per_s"] == pytest.approx(np.mean(d["tests"]["pp32"]["rates"]))
        for value in (f"{d['pp_tokens_per_s']:.1f}", f"{d['tg_tokens_per_s']:.1f}"):
            assert value in speed_html and value in md and value in out
        # the pick weighs the speed the study measured
        assert study["pick"]["levels"][lvl]["tg_tokens_per_s"] == d["tg_tokens_per_s"]
    assert "tg_tokens_per_s" in study["pick"]["result"]["objectives"]
    assert htmllib.escape("Speed and memory per level") in page and "Noise floor" in md
    # the rerun reused the measured speed (a new measurement would not repeat the same rates)
    assert json.loads((floor_study["dir"] / "speed.json").read_text())["result"]["levels"] == speed["levels"]
    for d in speed["levels"].values():
        assert f"{d['tg_tokens_per_s']:.1f}" in floor_study["rerun_output"]


def test_bad_speed_settings_are_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["study", "demo", "--speed", "128,32", "-o", str(tmp_path / "s")])
    assert res.exit_code == 2 and "--speed 128,32: give PP,TG,REPS" in res.output and "Traceback" not in res.output
