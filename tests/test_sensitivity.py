"""Static per-neuron sensitivity: the estimator against direct NumPy sums, E[x²] weighting, the CLI path.

GGUF files are real: written with gguf-py's GGUFWriter, the model side quantized to Q4_0 by llama.cpp's
own quantizer; the demo ladder for the CLI is quantized by llama.cpp, its imatrix collected by it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as QT  # noqa: E402

from ggml_probe.cli import cli  # noqa: E402
from ggml_probe.errors import ProbeError  # noqa: E402
from ggml_probe.formats.imatrix import Imatrix, ImatrixEntry, write_imatrix  # noqa: E402
from ggml_probe.weights.dequant import quantize_rows  # noqa: E402
from ggml_probe.weights.sensitivity import (  # noqa: E402
    UNWEIGHTED, format_sensitivity, neuron_sensitivity, predict, weighted_row_norms,
)
from test_weights import _write_gguf  # noqa: E402  (gguf-py writer helper shared by the weight tests)

N_EMBD, N_FF = 64, 96
KINDS = {"ffn_gate": (N_FF, N_EMBD), "ffn_up": (N_FF, N_EMBD), "ffn_down": (N_EMBD, N_FF)}


def test_weighted_row_norms_equal_a_direct_sum():
    rng = np.random.default_rng(0)
    d, m = rng.standard_normal((5, 7)), rng.uniform(0.0, 3.0, 7)
    direct = np.array([math.sqrt(sum(d[j, i] ** 2 * m[i] for i in range(7))) for j in range(5)])
    np.testing.assert_allclose(weighted_row_norms(d, m), direct, rtol=1e-13)
    np.testing.assert_allclose(weighted_row_norms(d), np.sqrt((d ** 2).sum(axis=1)), rtol=1e-13)


def test_a_channel_never_seen_contributes_nothing():
    rng = np.random.default_rng(1)
    d, m = rng.standard_normal((4, 6)), np.ones(6)
    m[3] = 0.0  # E[x_3²] = 0: no input ever reaches channel 3
    loud = d.copy()
    loud[:, 3] = 1e6  # so any error in its weights is harmless
    np.testing.assert_array_equal(weighted_row_norms(loud, m), weighted_row_norms(d, m))
    assert weighted_row_norms(loud)[0] > 1e5  # unweighted, the same error dominates


def test_act_and_down_in_predictions():
    gate_err, up_err = np.array([0.3, 0.0, 0.1]), np.array([0.4, 0.0, 0.0])
    gate_rms, up_rms = np.array([1.0, 2.0, 0.5]), np.array([2.0, 0.5, 0.0])
    p = predict(gate_err, up_err, gate_rms, up_rms)
    np.testing.assert_array_equal(p["act"], gate_err)  # SiLU' taken as 1
    # (r_gate·r_up)·sqrt((e_g/r_g)² + (e_u/r_u)²); a neuron whose up row never produces output: 0
    np.testing.assert_allclose(p["down_in"], [2.0 * math.sqrt(0.3 ** 2 + 0.2 ** 2), 0.0, 0.0], rtol=1e-15)
    q = predict(gate_err, up_err, gate_rms, up_rms, down_in_rms=np.array([5.0, 1.0, 0.0]))
    np.testing.assert_allclose(q["down_in"], [5.0 * math.sqrt(0.3 ** 2 + 0.2 ** 2), 0.0, 0.0], rtol=1e-15)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A two-layer F32 reference, its Q4_0 copy (llama.cpp's quantizer), and an imatrix-like E[x²]."""
    d = tmp_path_factory.mktemp("sens")
    rng = np.random.default_rng(3)
    ref, model, ms = {}, {}, {}
    for layer in range(2):
        for kind, shape in KINDS.items():
            w = (rng.standard_normal(shape) * rng.uniform(0.05, 1.0, (shape[0], 1))).astype(np.float32)
            name = f"blk.{layer}.{kind}.weight"
            ref[name], model[name] = w, (quantize_rows(w, QT.Q4_0), QT.Q4_0)
            ms[name] = rng.gamma(0.5, 2.0, shape[1]).astype(np.float32)
        ms[f"blk.{layer}.ffn_gate.weight"][:4] = 0.0  # channels that never fire
    deq = {n: gguf.quants.dequantize(v[0], v[1]).astype(np.float64) for n, v in model.items()}
    return {"ref_path": _write_gguf(d / "ref-F32.gguf", ref, block_count=2), "model_path": _write_gguf(d / "model-Q4_0.gguf", model, block_count=2),
            "ref": {n: v.astype(np.float64) for n, v in ref.items()}, "model": deq, "ms": ms, "dir": d}


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "imatrix"])
def test_file_estimate_equals_numpy(pair, weighted):
    ms = pair["ms"] if weighted else None
    # a small block forces the streamed path through several row blocks per tensor
    rep = neuron_sensitivity(pair["model_path"], pair["ref_path"], imatrix=ms, block_elements=3 * N_EMBD)
    assert rep.weighting == (UNWEIGHTED if not weighted else "E[x²] from imatrix (in memory)")
    assert [s.layer for s in rep.layers] == [0, 1]
    act_by_numpy = {}
    for layer in (0, 1):
        m, r = pair["model"], pair["ref"]
        g, u, dn = (f"blk.{layer}.{k}.weight" for k in KINDS)
        w_in = pair["ms"][g].astype(np.float64) if weighted else np.ones(N_EMBD)
        w_up = pair["ms"][u].astype(np.float64) if weighted else np.ones(N_EMBD)
        e_g = np.sqrt(((m[g] - r[g]) ** 2 * w_in).sum(axis=1))
        e_u = np.sqrt(((m[u] - r[u]) ** 2 * w_up).sum(axis=1))
        act_by_numpy[layer] = e_g
        r_g, r_u = np.sqrt((r[g] ** 2 * w_in).sum(axis=1)), np.sqrt((r[u] ** 2 * w_up).sum(axis=1))
        s = np.sqrt(pair["ms"][dn].astype(np.float64)) if weighted else r_g * r_u
        s_rep = rep.layer(layer)
        np.testing.assert_allclose(s_rep.act, e_g, rtol=1e-10)
        np.testing.assert_allclose(s_rep.down_in, s * np.sqrt((e_g / r_g) ** 2 + (e_u / r_u) ** 2), rtol=1e-10)
        np.testing.assert_allclose(s_rep.out, np.sqrt(((m[dn] - r[dn]) ** 2).sum(axis=0)) * s, rtol=1e-10)
    # the most sensitive neuron over both layers is NumPy's argmax of the gate-row error
    layer, j = max(((la, int(np.argmax(e))) for la, e in act_by_numpy.items()), key=lambda lj: act_by_numpy[lj[0]][lj[1]])
    best = rep.top("act", 1)[0]
    assert best[:2] == (layer, j) and best[2] == pytest.approx(act_by_numpy[layer][j], rel=1e-10)
    assert f"{layer}:{j}" in format_sensitivity(rep) and "most sensitive neurons (act" in format_sensitivity(rep)
    doc = json.loads(json.dumps(rep.to_dict(), allow_nan=False))  # strict JSON
    np.testing.assert_allclose(doc["layers"][1]["units"]["act"], act_by_numpy[1], rtol=1e-10)
    assert doc["top"]["act"][0] == {"layer": layer, "index": j, "value": pytest.approx(act_by_numpy[layer][j], rel=1e-10)}


def test_imatrix_file_is_read_and_a_foreign_one_refused(pair, tmp_path):
    entries = {n: ImatrixEntry(v.astype(np.float64).reshape(1, -1) * 10.0, np.array([10.0]))
               for n, v in pair["ms"].items()}
    path = write_imatrix(tmp_path / "ok.imatrix.gguf", Imatrix(entries))
    from_file = neuron_sensitivity(pair["model_path"], pair["ref_path"], imatrix=path, layers="-1")
    in_memory = neuron_sensitivity(pair["model_path"], pair["ref_path"], imatrix=pair["ms"], layers="1")
    assert from_file.weighting == f"E[x²] from imatrix {path}"
    np.testing.assert_allclose(from_file.layer(1).down_in, in_memory.layer(1).down_in, rtol=1e-6)

    wrong = dict(entries)
    wrong["blk.0.ffn_down.weight"] = ImatrixEntry(np.ones((1, N_EMBD)), np.array([1.0]))
    write_imatrix(tmp_path / "wrong.gguf", Imatrix(wrong))
    with pytest.raises(ProbeError, match=r"^imatrix wrong.gguf is for another model: blk.0.ffn_down.weight has 64 "
                                         r"values, the model's rows have 96$"):
        neuron_sensitivity(pair["model_path"], pair["ref_path"], imatrix=tmp_path / "wrong.gguf")
    extra = dict(entries)
    for layer in (2, 3):
        extra[f"blk.{layer}.ffn_up.weight"] = ImatrixEntry(np.ones((1, N_EMBD)), np.array([1.0]))
    write_imatrix(tmp_path / "deeper.gguf", Imatrix(extra))
    with pytest.raises(ProbeError, match=r"is for another model: ref-F32.gguf has no tensor "
                                         r"blk.2.ffn_up.weight, blk.3.ffn_up.weight$"):
        neuron_sensitivity(pair["model_path"], pair["ref_path"], imatrix=tmp_path / "deeper.gguf")


def test_weights_cli_with_and_without_imatrix(demo_ladder, tmp_path):
    from ggml_probe.engine.imatrix_capture import collect_imatrix

    f16, q4 = str(demo_ladder["F16"]), str(demo_ladder["Q4_0"])
    im = collect_imatrix(f16, ["Is the sky blue?\nAnswer:", "Do fish swim?\nAnswer:"], n_threads=1)
    im_path = write_imatrix(tmp_path / "demo.imatrix.gguf", im)
    runner = CliRunner()
    base = ["weights", q4, "--ref", f16, "--layers", "0", "--tensors", "ffn_gate"]

    plain = runner.invoke(cli, base + ["--json"])
    assert plain.exit_code == 0, plain.output
    assert "sensitivity" not in json.loads(plain.stdout)  # unchanged without --imatrix / --sensitivity
    text = runner.invoke(cli, base)
    assert text.exit_code == 0 and "neuron sensitivity" not in text.stdout

    res = runner.invoke(cli, base + ["--imatrix", str(im_path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["tensors"] == json.loads(plain.stdout)["tensors"]  # the error figures are untouched
    sens = doc["sensitivity"]
    assert sens["weighting"] == f"E[x²] from imatrix {im_path}" and [x["layer"] for x in sens["layers"]] == [0]
    api = neuron_sensitivity(q4, f16, imatrix=im_path, layers="0").layer(0)
    np.testing.assert_allclose(sens["layers"][0]["units"]["act"], api.act, rtol=1e-12)
    np.testing.assert_allclose(sens["layers"][0]["units"]["down_in"], api.down_in, rtol=1e-12)
    assert len(api.act) == 1536 and np.all(api.act > 0)  # Q4_0 moves every gate row of layer 0

    unweighted = runner.invoke(cli, base + ["--sensitivity"])
    assert unweighted.exit_code == 0 and "unweighted (E[x²] = 1" in unweighted.stdout
    # llama.cpp's imatrix weights the error toward channels with large inputs: the ranking changes
    u = neuron_sensitivity(q4, f16, layers="0").layer(0)
    assert not np.array_equal(np.argsort(u.act)[-10:], np.argsort(api.act)[-10:])

    foreign = Imatrix({"blk.0.ffn_gate.weight": ImatrixEntry(np.ones((1, 2048)), np.array([1.0]))})
    write_imatrix(tmp_path / "other.gguf", foreign)
    bad = runner.invoke(cli, base + ["--imatrix", str(tmp_path / "other.gguf")])
    assert bad.exit_code == 2
    assert bad.output.strip() == ("Error: imatrix other.gguf is for another model: blk.0.ffn_gate.weight has 2048 "
                                  "values, the model's rows have 576")
