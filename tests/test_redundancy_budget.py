"""The redundancy under a memory budget, through the commands users run: over the budget a default run
correlates an evenly spaced subset of each layer's neurons and says so; an explicit --redundancy-full that
cannot fit gets one line. The subset's correlations are checked against NumPy's np.corrcoef on those
neurons' values, captured from llama.cpp in a pass of their own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggml_probe.analysis.neurons import NeuronAccumulator, corr_histogram, pairs_above
from ggml_probe.cli import cli
from ggml_probe.errors import ProbeError
from ggml_probe.engine.model import Engine
from ggml_probe.engine.probes import FFNCapture, run_checked
from ggml_probe.models.synthetic import LlamaShape, WeightScales, write_llama_gguf
from ggml_probe.pipeline.tokens import decoded_tokens

from real_vocab_tiny import vocab_path

N_FF, LAYERS = 96, (0, 1)
# every neuron of 2 layers: 8 · 96² · (2 + 1) = 221,184 bytes; 100,000 fit every 2nd neuron (48: 55,296 bytes)
BUDGET, STRIDE = 100_000, 2


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    vocab = vocab_path("llama-spm")
    if not vocab.exists():
        pytest.skip(f"{vocab} not found")
    return write_llama_gguf(tmp_path_factory.mktemp("redundancy") / "tiny-2layer.gguf", vocab,
                            LlamaShape(2, 64, N_FF, 4, 2, 2048, tied=True), outtype="f32", seed=3,
                            scales=WeightScales(embedding=0.25, matrix=0.2))


def _neurons(model: Path, out: Path, *extra: str):
    args = ["neurons", str(model), "--task", "yesno-mini", "--limit", "6", "--layers", "0,1", "--salient-examples", "0",
            "--ablate-top", "0", "--threads", "1", "--gpu-layers", "0", "--batch", "1", "-o", str(out), *extra]
    return CliRunner().invoke(cli, args)


def _captured(model: Path, tokens: list[np.ndarray]) -> dict[int, np.ndarray]:
    """act values per layer over every prompt's tokens, from llama.cpp, each prompt decoded alone."""
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in LAYERS}

    def keep(layer, definition, values, layout):
        parts[layer].append(np.array(values, dtype=np.float64))

    capture = FFNCapture(model, keep, layers=list(LAYERS), definitions=("act",))
    with Engine(model, n_ctx=2048, n_threads=1, gpu_layers=0, hidden_states=False,
                eval_callback=capture.eval_callback) as engine:
        for t in tokens:
            run_checked(engine, capture, [t])
    return {layer: np.concatenate(p) for layer, p in parts.items()}


def test_default_redundancy_shrinks_to_the_budget_and_says_so(model, tmp_path):
    out = tmp_path / "run"
    res = _neurons(model, out, "--redundancy-budget", str(BUDGET), "--json")
    assert res.exit_code == 0, res.output
    levels = json.loads(res.stdout)["neurons"]
    (level,) = levels.values()
    note = level["redundancy_note"]
    assert "every 2nd neuron" in note and "48 of 96" in note and "--redundancy-full" in note, note
    assert json.loads((out / "manifest.json").read_text())["neurons"]["redundancy_note"] == note

    state = sorted((out / "neuron_state").glob("*.npz"))[-1]
    acc = NeuronAccumulator.load(state)
    ids = np.arange(0, N_FF, STRIDE)
    np.testing.assert_array_equal(acc.redundancy_neurons, ids)
    values = _captured(model, decoded_tokens(out))
    recorded = {e["layer"]: e["redundancy"] for e in json.loads((out / "neurons.json").read_text())["layers"]}
    for layer in LAYERS:
        x = values[layer]
        assert x.shape[0] == acc.stats[("act", layer)].count
        expected = np.corrcoef(x[:, ids], rowvar=False)
        np.testing.assert_allclose(acc.correlation("act", layer), expected, atol=2e-6)  # float32 block products
        assert recorded[layer]["neurons"] == len(ids) and recorded[layer]["stride"] == STRIDE
        assert recorded[layer]["histogram"] == corr_histogram(expected).tolist()
        assert sum(recorded[layer]["histogram"]) == len(ids) * (len(ids) - 1) // 2
        assert recorded[layer]["pairs_above"] == pairs_above(expected, 0.9)

    # the same run, printed: the note is a line of its own
    again = _neurons(model, out, "--redundancy-budget", str(BUDGET), "--resume")
    assert again.exit_code == 0, again.output
    assert "redundancy on a subset: every 2nd neuron" in again.stdout


def test_every_neuron_when_it_fits_and_an_explicit_request_that_cannot(model, tmp_path):
    res = _neurons(model, tmp_path / "full", "--json")  # 221 kB: far under the default budget
    assert res.exit_code == 0, res.output
    (level,) = json.loads(res.stdout)["neurons"].values()
    assert "redundancy_note" not in level
    acc = NeuronAccumulator.load(sorted((tmp_path / "full" / "neuron_state").glob("*.npz"))[-1])
    assert acc.redundancy_stride == 1 and acc.correlation("act", 0).shape == (N_FF, N_FF)

    refused = _neurons(model, tmp_path / "refused", "--redundancy-budget", str(BUDGET), "--redundancy-full",
                       "-q")
    assert refused.exit_code != 0
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and "216.0 KiB" in lines[0] and "--redundancy-budget" in lines[0], refused.output
    assert not (tmp_path / "refused" / "neuron_state").exists()

    bad = _neurons(model, tmp_path / "bad", "--redundancy-budget", "lots", "-q")
    assert bad.exit_code != 0 and "--redundancy-budget" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_study_notes_what_it_shrank_in_study_json_terminal_and_report(model, tmp_path):
    out = tmp_path / "study"
    args = ["study", str(model), "--quants", "F32", "--task", "yesno-mini", "--limit", "4", "--layers", "0,1",
            "--salient-examples", "0", "--no-kld", "--no-speed", "--no-noise-floor", "--trace-tokens", "0",
            "--no-weights", "--threads", "1", "--gpu-layers", "0", "--redundancy-budget", str(BUDGET), "-o", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    study = json.loads((out / "study.json").read_text())
    (note,) = study["study"]["notes"]
    assert note.startswith("redundancy on a subset: every 2nd neuron") and "--redundancy-full" in note
    assert study["tasks"]["yesno-mini"]["neurons"]["F32"]["redundancy_note"] == note
    assert f"note: {note}" in " ".join(res.stdout.split())  # the terminal wraps long lines
    assert f"**Note:** {note}." in (out / "report.md").read_text()


def test_api_and_cli_share_the_batch_default_and_an_old_default_run_says_what_to_pass(model, tmp_path):
    from ggml_probe.pipeline import DEFAULT_BATCH_PROMPTS
    from ggml_probe.pipeline.evaluation import EvalConfig, evaluate
    from ggml_probe.pipeline.study import StudyConfig

    option = next(p for p in cli.commands["eval"].params if p.name == "batch_prompts")
    assert EvalConfig().batch_prompts == StudyConfig().batch_prompts == option.default == DEFAULT_BATCH_PROMPTS > 1
    old = EvalConfig(task="yesno-mini", limit=4, threads=1, gpu_layers=0, n_boot=10, batch_prompts=1)  # the old default
    evaluate(model, old, tmp_path / "run")
    new = EvalConfig(task="yesno-mini", limit=4, threads=1, gpu_layers=0, n_boot=10)
    with pytest.raises(ProbeError, match=r"decoded with 1 prompt\(s\) per decode \(--batch 1; batch_prompts=1\), this "
                                         r"one asks for 32 prompt\(s\) per decode .*pass what it was made with"):
        evaluate(model, new, tmp_path / "run", resume=True)
    assert evaluate(model, old, tmp_path / "run", resume=True).resumed_examples == 4


def test_ablation_of_several_sets_in_one_context_equals_each_alone(model):
    """The study's ablation check runs the salient candidates and the random control on one model load and
    one clean pass: each set's result equals its own separate run (its own context, its own clean pass)."""
    from ggml_probe.attribution import ablation_effect, ablation_effects

    prompts = ["Is the sky blue? Answer:", "Do fish swim? Answer:", "Is ice hot? Answer:"]
    sets = {"top": [0, 5, 17], "control": [40, 41]}
    together = ablation_effects(model, prompts, 1, sets, definition="act", n_ctx=256, n_threads=1, gpu_layers=0)
    for name, ids in sets.items():
        alone = ablation_effect(model, prompts, 1, ids, definition="act", n_ctx=256, n_threads=1, gpu_layers=0)
        np.testing.assert_array_equal(together[name].target_tokens, alone.target_tokens)
        np.testing.assert_array_equal(together[name].logprob_clean, alone.logprob_clean)
        np.testing.assert_array_equal(together[name].logprob_patched, alone.logprob_patched)
        assert together[name].patched_tensors == alone.patched_tensors > 0
    assert np.abs(together["top"].delta).max() > 0 and not np.array_equal(together["top"].delta, together["control"].delta)


def test_a_run_of_the_same_file_takes_a_donors_attribution_only_when_made_from_the_same_inputs(model, tmp_path):
    """The noise floor's runs of the reference take its salient neurons when their attribution would be the
    same computation (the attribution's passes do not use the run's batch layout): equal to computing them."""
    from ggml_probe.pipeline.evaluation import EvalConfig
    from ggml_probe.pipeline.neurons import NeuronAnalysis
    from ggml_probe.pipeline.runs import run_level_files

    files = {"F32": model}
    analysis = NeuronAnalysis(layers="0,1", salient_examples=3, ablate_top=2)
    light = NeuronAnalysis(layers="0,1", salient_examples=3, ablate_top=0, redundancy=False)

    def run(name, batch, threads, neurons, donors=()):
        config = EvalConfig(task="yesno-mini", limit=5, threads=threads, gpu_layers=0, n_boot=10, batch_prompts=batch)
        res = run_level_files(files, config, tmp_path / name, neurons=neurons, salient_donors=donors)
        return json.loads((res.run_dirs["F32"] / "salient.json").read_text()), res.run_dirs["F32"]

    donor, donor_dir = run("reference", 1, 1, analysis)
    taken, _ = run("packed", 4, 1, light, (donor_dir,))
    computed, _ = run("packed-alone", 4, 1, light)
    assert taken["reused_from"] == str(donor_dir) and "reused_from" not in computed
    assert taken["targets"] == computed["targets"] == donor["targets"]
    assert taken["layers"] == computed["layers"]  # no ablation check in either: the floor's light settings
    assert all("ablation" in e for e in donor["layers"].values())
    other_threads, _ = run("threads", 1, 2, light, (donor_dir,))
    assert "reused_from" not in other_threads  # other engine settings: computed anew
