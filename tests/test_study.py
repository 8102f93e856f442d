"""The whole study: resumption after a kill, the directory lock, a full disk, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from ggml_probe.cli import cli
from ggml_probe.errors import ProbeError
from ggml_probe.pipeline.rundir import directory_lock

STUDY_ARGS = ["--quants", "F16,Q4_0", "--task", "yesno-mini", "--limit", "12", "--no-weights", "--no-neurons", "-q",
              "--no-noise-floor", "--no-speed"]  # test_noise_floor covers those


@pytest.fixture()
def store(tmp_path, monkeypatch, demo_ladder):
    # The ladder files already built for this session serve as the study's store.
    monkeypatch.setenv("GGML_PROBE_MODELS", str(demo_ladder["F16"].parent))
    return demo_ladder["F16"].parent


def _predictions(study_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.parent.name: pd.read_parquet(p) for p in sorted(study_dir.glob("runs/*/*/predictions.parquet"))}


@pytest.mark.slow
def test_a_killed_study_resumes_to_the_uninterrupted_result(store, tmp_path):
    env = {**os.environ, "GGML_PROBE_MODELS": str(store)}
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-m", "ggml_probe.cli", "study", "demo", *STUDY_ARGS, "-o", str(whole)],
                   check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ggml_probe.cli", "study", "demo", *STUDY_ARGS, "-o", str(killed),
                             "--ctx", "2048"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(killed.glob("runs/*/F16/chunks/*.npz")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(killed.glob("runs/*/F16/chunks/*.npz")), "the study never checkpointed"
    assert not (killed / "study.json").exists()
    res = subprocess.run([sys.executable, "-m", "ggml_probe.cli", "study", "demo", *STUDY_ARGS, "-o", str(killed)],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    a, b = _predictions(whole), _predictions(killed)
    assert set(a) == set(b) == {"F16", "Q4_0"}
    for level in a:
        pd.testing.assert_frame_equal(a[level], b[level])
    sa, sb = json.loads((whole / "study.json").read_text()), json.loads((killed / "study.json").read_text())
    assert sa["tasks"]["yesno-mini"]["runs"]["Q4_0"]["metrics"] == sb["tasks"]["yesno-mini"]["runs"]["Q4_0"]["metrics"]
    assert sa["tasks"]["yesno-mini"]["comparison"] == sb["tasks"]["yesno-mini"]["comparison"]


def test_two_studies_in_one_directory_are_refused(store, tmp_path):
    out = tmp_path / "busy"
    with directory_lock(out):
        res = CliRunner().invoke(cli, ["study", "demo", *STUDY_ARGS, "-o", str(out)])
    assert res.exit_code == 2
    assert "in use by another ggml-probe run" in res.output and "Traceback" not in res.output


def test_a_full_disk_leaves_no_corrupted_result(tmp_path):
    from ggml_probe.pipeline.rundir import write_json

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        write_json(mnt / "metrics.json", {"ok": 1})
        with pytest.raises(ProbeError, match="disk full"):
            write_json(mnt / "metrics.json", {"big": "x" * 200_000})
        assert json.loads((mnt / "metrics.json").read_text()) == {"ok": 1}  # the old file is intact
        assert [p.name for p in mnt.iterdir()] == ["metrics.json"]  # no partial file left behind
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("args, message", [
    (["--quants", "F16,Q4_Z"], "unknown quant type 'Q4_Z'"),
    (["--task", "nosuchtask"], "unknown task"),
    (["--task", "boolq", "--data", "boolq=/no/such/file.jsonl"], "does not exist"),
])
def test_bad_study_input_is_one_line(store, tmp_path, args, message):
    res = CliRunner().invoke(cli, ["study", "demo", *args, "-o", str(tmp_path / "s"), "-q"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_corrupted_gguf_is_refused(tmp_path, demo_path):
    bad = tmp_path / "model.gguf"
    data = bytearray(demo_path.read_bytes()[:2_000_000])
    data[4] = 99  # version
    bad.write_bytes(bytes(data))
    res = CliRunner().invoke(cli, ["study", str(bad), "-o", str(tmp_path / "s"), "-q"])
    assert res.exit_code == 2 and "GGUF" in res.output and "Traceback" not in res.output
