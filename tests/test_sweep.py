"""`ggml-probe sweep`: a grid of the demo model and a tiny generated model × 3 levels × 2 tasks, sequentially and
on a real local Ray cluster (127.0.0.1, two worker CPUs): the same figures, a worker killed mid-cell retried,
a second sweep recomputing nothing, a corrupt model reported while the rest completes, bad input in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ggml_probe.cli import cli
from ggml_probe.errors import ProbeError
from ggml_probe.pipeline.sweep import load_spec, run_sweep
from real_vocab_tiny import vocab_path, write_tiny_model
from test_fetch import REPO, hub_cache, label_of, offline  # noqa: F401  (hub_cache, offline: fixtures)
from test_report import _chromium

LEVELS = ["F16", "Q8_0", "Q4_0"]
TASKS = ["boolq", "jigsaw"]
# Small and cheap, every part real: 4 examples, the neuron pass with redundancy, one attributed prompt,
# the text KLD over 2 chunks of 128 tokens; no weight error (its own tests cover it).
SPEC = """models = ["demo", "tiny.gguf", "broken.gguf"]
quants = ["F16", "Q8_0", "Q4_0"]
tasks = ["boolq", "jigsaw"]
limit = 4
layers = "0,-1"
salient_examples = 1
ablate_top = 0
weights = false
kld_ctx = 128
kld_chunks = 2
allow_requantize = true
[data]
boolq = "{boolq}"
jigsaw = "{jigsaw}"
"""


@pytest.fixture(scope="module")
def grid(demo_ladder, boolq_path, jigsaw_path, tmp_path_factory):
    """The sweep folder: SWEEP.toml, the tiny model, a truncated copy of it; the demo's ladder as the store."""
    root = tmp_path_factory.mktemp("sweep")
    tiny = write_tiny_model(root / "tiny.gguf", vocab_path("llama-spm"))
    (root / "broken.gguf").write_bytes(tiny.read_bytes()[:3_000_000])
    (root / "SWEEP.toml").write_text(SPEC.format(boolq=boolq_path, jigsaw=jigsaw_path))
    store = root / "models"  # the demo's ladder built for this session, linked; the tiny model's ladder is built here
    store.mkdir()
    for path in demo_ladder.values():
        (store / path.name).symlink_to(path)
    old = os.environ.get("GGML_PROBE_MODELS")
    os.environ["GGML_PROBE_MODELS"] = str(store)
    yield root
    if old is None:
        os.environ.pop("GGML_PROBE_MODELS", None)
    else:
        os.environ["GGML_PROBE_MODELS"] = old


@pytest.fixture(scope="module")
def sequential(grid):
    res = CliRunner().invoke(cli, ["sweep", str(grid / "SWEEP.toml"), "-o", str(grid / "seq"), "--cpus-per-cell", "1",
                                   "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


TIMINGS = ("seconds", "tokens_per_second")


def _by_key(cells: list[dict]) -> dict[tuple, dict]:
    return {(c["model"], c.get("task") or c.get("text"), c["level"]): c for c in cells}


def _figures(cell: dict) -> dict:
    return {k: v for k, v in (cell.get("figures") or {}).items() if k not in TIMINGS}


def _predictions(out: Path) -> dict[str, pd.DataFrame]:
    return {str(p.parent.relative_to(out)): pd.read_parquet(p) for p in sorted(out.glob("*/runs/*/*/predictions.parquet"))}


@pytest.mark.slow
def test_sequential_sweep_every_cell_and_its_figures(sequential, grid):
    cells = _by_key(sequential["cells"])
    task_cells = {k: c for k, c in cells.items() if c.get("task")}
    assert set(task_cells) == {(m, t, lvl) for m in ("demo", "tiny.gguf") for t in TASKS for lvl in LEVELS}
    assert all(c["status"] == "computed" for c in cells.values()), [c for c in cells.values() if c["status"] != "computed"]
    # the text KLD of every level but the reference, once per model
    assert {k for k in cells if not cells[k].get("task")} == {(m, "text:boolq+jigsaw", lvl) for m in ("demo", "tiny.gguf")
                                                              for lvl in ("Q8_0", "Q4_0")}
    for (model, task, level), c in task_cells.items():
        slug = "demo" if model == "demo" else "tiny"
        pred = pd.read_parquet(grid / "seq" / slug / "runs" / task / level / "predictions.parquet")
        # accuracy recomputed from the label probabilities: the argmax label against the gold one
        labels = [col[2:] for col in pred.columns if col.startswith("p_")]
        chosen = np.array(labels)[np.argmax(pred[[f"p_{lab}" for lab in labels]].to_numpy(), axis=1)]
        assert c["figures"]["accuracy"] == pytest.approx(np.mean(chosen == pred["gold"].astype(str).to_numpy()))
        assert c["figures"]["n"] == 4 and len(pred) == 4
    # each model's study is merged from its cells: the same figures, the KLD read rather than recomputed
    for model, slug in (("demo", "demo"), ("tiny.gguf", "tiny")):
        study = json.loads((grid / "seq" / slug / "study.json").read_text())
        assert study["kld"]["base_source"] == "cached"
        for level in ("Q8_0", "Q4_0"):
            assert study["kld"]["models"][level]["kld_mean"] == cells[(model, "text:boolq+jigsaw", level)]["figures"]["kld_mean"]
        for task in TASKS:
            for level in LEVELS:
                acc = study["tasks"][task]["runs"][level]["metrics"]["label_set"]["accuracy"]["value"]
                assert acc == cells[(model, task, level)]["figures"]["accuracy"]
        assert sequential["models"][model]["pick"] == study["pick"]["result"]["pick"]
    # the corrupt model: one line, the rest of the sweep completed
    assert "truncated" in sequential["models"]["broken.gguf"]["error"]
    sweep = json.loads((grid / "seq" / "sweep.json").read_text())
    redundant = sweep["models"]["demo"]["tasks"]["boolq"]["F16"]["redundant_pairs"]
    assert set(redundant) == {"0", "29"} and redundant["29"] > 0


@pytest.mark.slow
def test_merged_report_renders_in_headless_chromium(sequential, grid, tmp_path):
    page = (grid / "seq" / "report.html").read_text()
    assert "Which level to run, per model" in page and "Redundant neuron pairs per model and level" in page
    assert "truncated" in page  # the failed model is reported
    md = (grid / "seq" / "report.md").read_text()
    assert "(plots/sweep_quality.png)" in md and (grid / "seq" / "plots" / "sweep_quality.png").exists()
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian package: chromium)")
    from PIL import Image

    shot = tmp_path / "sweep.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,2000",
                        (grid / "seq" / "report.html").resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (2000, 1400)
    assert img.std() > 20
    assert img[:80].mean() < 120 and img[300:].mean() > 180  # the dark header band: the page is styled


def _kill_first_cell_worker(out: Path, killed: list[int], stop: threading.Event) -> None:
    """Kill (SIGKILL, by pid) the Ray worker that runs the first cell seen running."""
    while not stop.is_set():
        for marker in out.glob("*/runs/*/*.running"):
            try:
                pid = int(marker.read_text())
            except (OSError, ValueError):
                continue
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_ray_sweep_equals_sequential_with_a_worker_killed_and_reruns_nothing(sequential, grid):
    ray = pytest.importorskip("ray")
    from ggml_probe.pipeline.sweep_ray import RayExecutor

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=80 * 1024 * 1024, log_to_driver=False)
    try:
        out = grid / "ray"
        killed: list[int] = []
        stop = threading.Event()
        killer = threading.Thread(target=_kill_first_cell_worker, args=(out, killed, stop), daemon=True)
        killer.start()
        try:
            result = run_sweep(load_spec(grid / "SWEEP.toml"), out, RayExecutor(cpus_per_cell=1))
        finally:
            stop.set()
        assert killed, "no cell was seen running"
        seq, par = _by_key(sequential["cells"]), _by_key(result["cells"])
        assert set(seq) == set(par)
        for key in seq:  # the killed cell was retried: every cell finished, with the sequential figures
            assert par[key]["status"] == "computed", par[key]
            assert _figures(par[key]) == _figures(seq[key]), key
        a, b = _predictions(grid / "seq"), _predictions(out)
        assert set(a) == set(b) and len(a) == 12
        for k in a:
            pd.testing.assert_frame_equal(a[k], b[k])
        assert {m: s.get("pick") for m, s in result["models"].items()} == {m: s.get("pick") for m, s in sequential["models"].items()}

        # a second sweep on the same directory (through the CLI, on the same cluster) recomputes no cell
        def results():  # every file of every cell (the lock files are touched by any reader)
            return {p: p.stat().st_mtime_ns for p in out.glob("*/runs/*/*/*") if p.name != ".lock"}

        mtimes = results()
        res = CliRunner().invoke(cli, ["sweep", str(grid / "SWEEP.toml"), "-o", str(out), "--ray", "--json"])
        assert res.exit_code == 0, res.output
        again = json.loads(res.stdout)
        assert {c["status"] for c in again["cells"]} == {"cached"}
        assert results() == mtimes
        # and a sequential sweep reuses the Ray sweep's cells (the thread count is not part of a cell)
        res = CliRunner().invoke(cli, ["sweep", str(grid / "SWEEP.toml"), "-o", str(out), "--json"])
        assert res.exit_code == 0, res.output
        assert {c["status"] for c in json.loads(res.stdout)["cells"]} == {"cached"}
        assert results() == mtimes
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


# ------------------------------------------------------------------ bad input: one line, before any work


def _sweep_cli(*args: str):
    return CliRunner().invoke(cli, ["sweep", *args])


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.mark.parametrize("change, named", [
    ('models = ["demo", "no-such-model.gguf"]', "no-such-model.gguf"),
    ('quants = ["F16", "Q9_9"]', "Q9_9"),
    ('tasks = ["no-such-task"]', "no-such-task"),
    ('limt = 4', "limt"),
    ('limit = "four"', "limit"),
    ('data = {boolq = "boolq.jsonl"}', "boolq"),
])
def test_bad_spec_is_one_line_naming_it(tmp_path, change, named):
    key = change.split(" =")[0]
    base = {"models": 'models = ["demo"]', "quants": 'quants = ["F16", "Q4_0"]', "tasks": 'tasks = ["yesno-mini"]',
            "limit": "limit = 4", "data": ""}
    base[key] = change
    spec = tmp_path / "SWEEP.toml"
    spec.write_text("\n".join(base.values()) + "\n")
    line = _one_line_error(_sweep_cli(str(spec), "-o", str(tmp_path / "out")))
    assert named in line
    assert not (tmp_path / "out").exists()  # before any work


def test_hub_models_resolve_through_the_hugging_face_cache(offline, tmp_path):
    """hf:OWNER/REPO[:QUANT]: that quant's file, by default the repo's highest precision (a real hub cache)."""
    spec = tmp_path / "SWEEP.toml"
    spec.write_text(f'models = ["hf:{REPO}:Q8_0", "hf:{REPO}"]\nquants = ["F16"]\ntasks = ["yesno-mini"]\n')
    paths = load_spec(spec).model_paths
    assert label_of(paths[f"hf:{REPO}:Q8_0"]) == "Tiny-Q8_0.gguf"
    assert label_of(paths[f"hf:{REPO}"]) == "Tiny-F16.gguf"  # F16 is the highest precision the repo offers
    spec.write_text(f'models = ["hf:{REPO}:Q2_K"]\nquants = ["F16"]\ntasks = ["yesno-mini"]\n')
    line = _one_line_error(_sweep_cli(str(spec), "-o", str(tmp_path / "out")))
    assert f"unknown model 'hf:{REPO}:Q2_K'" in line and "F16" in line  # what the repo does offer
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address_is_one_line(tmp_path):
    pytest.importorskip("ray")
    spec = tmp_path / "SWEEP.toml"
    spec.write_text('models = ["demo"]\nquants = ["F16"]\ntasks = ["yesno-mini"]\nlimit = 2\n')
    with socket_port() as port:  # a port nothing listens on
        line = _one_line_error(_sweep_cli(str(spec), "-o", str(tmp_path / "out"), "--ray", f"127.0.0.1:{port}"))
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in line


def test_a_directory_of_another_spec_is_refused_unless_forced(tmp_path):
    spec = tmp_path / "SWEEP.toml"
    spec.write_text('models = ["demo"]\nquants = ["F16"]\ntasks = ["yesno-mini"]\nlimit = 2\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"spec_path": "/elsewhere/OTHER.toml", "spec_sha256": "0" * 64}))
    line = _one_line_error(_sweep_cli(str(spec), "-o", str(out)))
    assert "another SWEEP.toml" in line and "--force" in line
    from ggml_probe.pipeline.sweep import _check_directory

    _check_directory(out, load_spec(spec), force=True)  # accepted with --force
    with pytest.raises(ProbeError, match="another SWEEP.toml"):
        _check_directory(out, load_spec(spec), force=False)


class socket_port:
    """A free local TCP port, closed again (so connecting to it is refused)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        pass
