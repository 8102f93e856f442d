"""Attribution: the torch model rebuilt from GGUF weights, integrated gradients at any layer, the
direct-effect attribution, and the CLI's --attribution — each against an independent computation."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from test_convert import CASES, convert_to, tiny  # noqa: F401  (tiny: the module fixture)

torch = pytest.importorskip("torch")

from ggml_probe.attribution import METHODS, attribute  # noqa: E402
from ggml_probe.attribution.types import converged
from ggml_probe.attribution.ig import integrated_gradients  # noqa: E402
from ggml_probe.attribution.passes import read_last_layer_head  # noqa: E402
from ggml_probe.attribution.torch_model import TorchModel  # noqa: E402
from ggml_probe.cli import cli  # noqa: E402
from ggml_probe.errors import ProbeError  # noqa: E402


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------ the torch model


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_torch_model_equals_transformers(tiny, tmp_path, case):  # noqa: F811
    """llama3 rope factors, linear rope scaling, qwen2 biases and NEOX rope, head_dim ≠ n_embd/n_head."""
    model = tiny(case)
    path = convert_to(model, tmp_path, "f32")
    tm = TorchModel(path, device="cpu", dtype="float64")
    for n in (len(model.token_ids), 7):  # the full sequence and a prefix
        ours, _ = tm.run(model.token_ids[:n])
        ref = torch.log_softmax(torch.tensor(model.reference_logits[n - 1], dtype=torch.float64), -1).numpy()
        ours = ours.numpy()[: ref.shape[0]]
        assert np.abs(ours - ref).max() < 1e-4, (case, n, np.abs(ours - ref).max())


def test_unsupported_architecture_is_one_line(tmp_path):
    from ggml_probe.attribution.torch_model import _hyper
    from ggml_probe.errors import UnsupportedArchitecture

    class Fake:
        architecture, path = "bert", tmp_path / "x.gguf"

    with pytest.raises(UnsupportedArchitecture, match="bert: --attribution ig supports llama"):
        _hyper(Fake())


def _head_only_gguf(path, arch: str, rms_eps: float | None, ln_eps: float | None):
    """A one-layer GGUF with just what the closed-form head reads, and the norm epsilons given."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_feed_forward_length(4)
    w.add_embedding_length(2)
    if rms_eps is not None:
        w.add_layer_norm_rms_eps(rms_eps)
    if ln_eps is not None:
        w.add_layer_norm_eps(ln_eps)
    rng = np.random.default_rng(0)
    for name, shape in {"token_embd.weight": (8, 2), "output_norm.weight": (2,), "blk.0.ffn_down.weight": (2, 4),
                        "blk.0.ffn_up.weight": (4, 2), "blk.0.ffn_gate.weight": (4, 2)}.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_head_norm_follows_the_architecture_not_the_metadata(tmp_path):
    """llama.cpp builds Phi-2 with LayerNorms (LLM_NORM, src/models/phi2.cpp) and llama with RMSNorms whatever
    else the file carries: the closed-form head takes the kind from the family registry and the epsilon
    from that kind's key, and a file missing that key is one clear error, not the other norm."""
    phi2 = read_last_layer_head(_head_only_gguf(tmp_path / "phi2.gguf", "phi2", 1e-6, 1e-5), 0)
    assert phi2.layer_norm and phi2.eps == float(np.float32(1e-5))
    llama = read_last_layer_head(_head_only_gguf(tmp_path / "llama.gguf", "llama", 1e-6, 1e-5), 0)
    assert not llama.layer_norm and llama.eps == float(np.float32(1e-6))
    with pytest.raises(ProbeError, match="no llama.attention.layer_norm_rms_epsilon in the metadata"):
        read_last_layer_head(_head_only_gguf(tmp_path / "llama_ln.gguf", "llama", None, 1e-5), 0)


# ------------------------------------------------------------------ integrated gradients


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    import neurons_tiny

    from ggml_probe.models.convert import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("attr-tiny")
    neurons_tiny.build_hf(root / "hf")
    return {"hf": root / "hf", "gguf": convert_hf_to_gguf(root / "hf", root / "tiny-f32.gguf", outtype="f32")}


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_ig_equals_autograd_on_transformers(tiny_llama, layer):
    """Every layer, every position: the same integral computed on HF's model by plain autograd."""
    import neurons_tiny

    from ggml_probe.engine.model import Vocab

    with Vocab(tiny_llama["gguf"]) as vocab:
        ids = [int(t) for t in vocab.tokenize("the quick brown fox jumps over it")]
    tm = TorchModel(tiny_llama["gguf"], device="cpu", dtype="float64")
    ours = integrated_gradients(tiny_llama["gguf"], [np.array(ids)], [layer], model=tm, n_points=50)
    target = int(ours.target_tokens[0])
    ref = neurons_tiny.torch_layer_ig(tiny_llama["hf"], ids, layer, target, n_points=50)
    a, r = ours.layers[layer].attributions[0], ref["attributions"]
    assert np.abs(r).max() > 1e-3  # the comparison means something
    # float64 both sides; HF computes its rope frequencies in float32, hence not 1e-12
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())
    assert abs(ours.target_logprob[0] - ref["logp_input"]) < 1e-5


@pytest.mark.slow
def test_ig_on_demo_converges_and_matches_the_exact_last_layer(demo_ladder):
    """On the demo's F16 file: layers 14 and 29 close their completeness; at the last layer the torch
    integral equals the closed form computed from llama.cpp's own activations."""
    f16 = demo_ladder["F16"]
    prompts = ["Respond with True or False only.\nis the sky blue on a clear day\nAnswer:",
               "Respond with True or False only.\ndo fish live in the desert sand\nAnswer:"]
    ig = attribute("ig", f16, prompts, [14, 29], threads=2)
    exact = attribute("exact", f16, prompts, [14, 29], targets=list(ig.target_tokens), threads=2)
    assert list(exact.layers) == [29]  # the exact method covers the last layer only
    for L in (14, 29):
        la = ig.layers[L]
        assert np.abs(la.completeness_error).max() < 1e-3, (L, la.completeness_error)
        assert la.converged.all() and np.abs(la.real_change).min() > 1e-3
    for p in range(len(prompts)):
        a, e = ig.layers[29].attributions[p], exact.layers[29].attributions[p]
        assert spearman(a, e) > 0.999
        assert np.abs(a - e).max() < 0.02 * np.abs(e).max()  # F16 compute in llama.cpp vs fp32 in torch


def test_convergence_rule():
    err = np.array([0.005, 0.02, 0.02, 3.0])
    change = np.array([0.0, 0.0, 1.0, 17.0])
    assert converged(err, change).tolist() == [True, False, True, False]


# ------------------------------------------------------------------ direct effect


@pytest.mark.slow
def test_direct_effect_equals_autograd_on_transformers(tiny_llama):
    """(a − b) ⊙ up ⊙ W_downᵀ ∂log p/∂r_final at the last position, with the gradient taken by autograd
    through HF's final norm and lm_head, for every layer."""
    import transformers

    from ggml_probe.engine.model import Vocab

    with Vocab(tiny_llama["gguf"]) as vocab:
        ids = [int(t) for t in vocab.tokenize("a tiny model reads this line")]
    ours = attribute("dla", tiny_llama["gguf"], [np.array(ids, dtype=np.int32)], [0, 1, 2], threads=2)
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama["hf"], dtype=torch.float64).eval()
    seen: dict = {}
    hooks = [model.model.norm.register_forward_pre_hook(lambda _m, i: seen.__setitem__("r", i[0][0, -1].clone()))]
    for L, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.act_fn.register_forward_hook(
            lambda _m, _i, o, L=L: seen.__setitem__(("act", L), o[0, -1].clone())))
        hooks.append(layer.mlp.up_proj.register_forward_hook(
            lambda _m, _i, o, L=L: seen.__setitem__(("up", L), o[0, -1].clone())))
    with torch.no_grad():
        model(torch.zeros((1, len(ids)), dtype=torch.long))
        base = {L: seen[("act", L)] for L in range(3)}
        logits = model(torch.tensor([ids])).logits[0, -1]
    for h in hooks:
        h.remove()
    target = int(logits.argmax())
    assert int(ours.target_tokens[0]) == target
    r = seen["r"].clone().requires_grad_(True)
    torch.log_softmax(model.lm_head(model.model.norm(r)), -1)[target].backward()
    for L in range(3):
        w_down = model.model.layers[L].mlp.down_proj.weight
        ref = ((seen[("act", L)] - base[L]) * seen[("up", L)] * (w_down.T @ r.grad)).detach().numpy()
        got = ours.layers[L].attributions[0]
        assert np.abs(ref).max() > 1e-4
        # llama.cpp keeps its KV cache in F16: activations agree to ~1e-3 relative, not to f32 rounding
        np.testing.assert_allclose(got, ref, atol=1e-2 * np.abs(ref).max())
        assert spearman(got, ref) > 0.999
        assert ours.layers[L].completeness_error is None  # not an integral: no convergence claim


# ------------------------------------------------------------------ CLI


def _neurons(tmp_path, boolq_path, *extra):
    out = tmp_path / "run"
    args = ["neurons", "demo", "--task", "boolq", "--data", str(boolq_path), "--limit", "3", "--layers", "0,-1",
            "--salient-examples", "2", "--threads", "2", "-o", str(out), "--quiet", *extra]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res, json.loads((out / "salient.json").read_text())


@pytest.mark.slow
def test_cli_dla_is_labelled_direct_effect(tmp_path, boolq_path):
    res, sal = _neurons(tmp_path, boolq_path, "--attribution", "dla")
    assert sal["method"] == "dla" and sal["paper_method"] is False
    assert "DIRECT EFFECT ONLY" in sal["label"] and "DIRECT EFFECT ONLY" in res.output
    assert sorted(sal["layers"], key=int) == ["0", "29"]
    assert all("converged" not in d for d in sal["layers"].values())
    assert all(d["count"] >= 1 and len(d["union"]) == d["count"] for d in sal["layers"].values())
    for d in sal["layers"].values():  # the causal check beside every attributed layer
        ab = d["ablation"]
        assert ab["neurons"] == d["ranking"][:5] and len(ab["control_neurons"]) == len(ab["neurons"])
        assert not set(ab["neurons"]) & set(ab["control_neurons"])
        assert np.isfinite([ab["delta_logprob_mean"], ab["control_delta_logprob_mean"]]).all()
        assert ab["delta_logprob_abs_mean"] > 0  # switching neurons off inside llama.cpp did something
    assert "switching off the top" in " ".join(res.output.split())


@pytest.mark.slow
def test_cli_ig_reports_convergence_per_layer(tmp_path, boolq_path):
    res, sal = _neurons(tmp_path, boolq_path, "--attribution", "ig")
    assert sal["method"] == "ig" and sal["paper_method"] is True and sal["n_prompts"] == 2
    for key, d in sal["layers"].items():
        assert d["converged_prompts"] <= 2 and d["completeness_error_mean"] >= 0
        warned = f"layer {key}: the 50-step integral did not converge" in " ".join(res.output.split())
        assert warned == (not d["converged"])
    assert sal["layers"]["29"]["converged"]  # the last layer's integral is smooth


def test_methods_registry_labels():
    assert set(METHODS) == {"exact", "ig", "dla"}
    assert METHODS["ig"].paper and METHODS["exact"].paper and not METHODS["dla"].paper
    assert not METHODS["exact"].all_layers and METHODS["ig"].needs_torch


def test_paper_mode_attributes_every_layer_when_torch_is_there():
    from ggml_probe.pipeline.study import StudyConfig

    config = StudyConfig(paper=True)
    config.apply_paper()
    assert config.attribution == "ig"  # torch is importable here (this module skips otherwise)
    explicit = StudyConfig(paper=True, attribution="exact")
    explicit.apply_paper()
    assert explicit.attribution == "exact"  # an explicit choice is kept


@pytest.mark.slow
def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python example, executed as written (in a scratch directory)."""
    import ast
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## Library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    kl_line, salient_line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert float(kl_line) > 0  # Q4_0 moved the next-token distribution away from F16's
    salient = ast.literal_eval(salient_line)
    assert set(salient) == {0, 29}
    assert all(len(ids) >= 1 and len(flags) == 1 for ids, flags in salient.values())
