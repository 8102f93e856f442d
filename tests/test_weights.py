"""Weight-level analysis: dequantization against ggml and gguf-py, error figures, dumps, bad input.

Everything is real: arrays are quantized with llama.cpp's own quantizer (ggml_quantize_chunk in
the libggml that llama-cpp-python ships), GGUF files are written with gguf-py's GGUFWriter or by
llama.cpp's llama_model_quantize (the demo ladder), and every figure is checked against an
independent computation (gguf-py's NumPy dequantizer, plain NumPy, the `safetensors` package).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from gguf import GGMLQuantizationType as QT  # noqa: E402

from ggml_probe.errors import OutputExists, ProbeError  # noqa: E402
from ggml_probe.weights.dequant import (  # noqa: E402
    QUANTIZABLE, GGUFTensors, backends_for, can_dequantize, dequantize_bytes, quantize_rows, type_facts,
)
from ggml_probe.weights.dump import dump_tensors  # noqa: E402
from ggml_probe.layerspec import parse_layer_spec  # noqa: E402
from ggml_probe.weights.error import compare_weights, format_report, select_tensors  # noqa: E402

# Every type llama.cpp can quantize to that gguf-py can also dequantize: the bit-exact set.
BOTH = sorted(
    (t for t in QT if t.name in QUANTIZABLE and t.name != "F32" and {"ggml", "numpy"} <= set(backends_for(t))),
    key=int,
)
# Worst relative RMSE each family may reach on Gaussian rows (catches a dequantizer returning junk).
MAX_REL_ERR = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.01, "Q6_K": 0.03, "Q5": 0.06, "Q4": 0.12, "IQ4": 0.12,
               "MXFP4": 0.2, "NVFP4": 0.15, "Q3_K": 0.2, "IQ3": 0.25, "Q2_K": 0.35, "IQ2": 0.45, "IQ1": 0.65,
               "TQ": 1.0}


def _bound(name: str) -> float:
    for prefix in sorted(MAX_REL_ERR, key=len, reverse=True):
        if name.startswith(prefix):
            return MAX_REL_ERR[prefix]
    raise KeyError(name)


def _test_matrix(rows: int = 24, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Gaussian rows of very different scales, plus rows that stress block scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(1e-3, 3.0, (rows, 1)).astype(np.float32)
    x[0] = 0.0  # an all-zero row: scale 0
    x[1] = 0.25  # constant
    x[2, 7] = 40.0  # one outlier in an otherwise ordinary row
    x[3] *= 1e-6  # tiny values: fp16 block scales near the subnormal range
    x[4] = np.abs(x[4])  # all positive (min/offset types)
    return x


def _write_gguf(path: Path, tensors: dict, arch: str = "llama", block_count: int | None = None) -> Path:
    """A GGUF file via gguf-py's writer. Values: float32 arrays (NumPy order) or (uint8 blocks, type)."""
    w = gguf.GGUFWriter(str(path), arch)
    if block_count is not None:
        w.add_block_count(block_count)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            blocks, qtype = value
            w.add_tensor(name, blocks, raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------
# (a) bit-exactness: ggml's dequantizer against gguf-py's, on llama.cpp-quantized data


def test_the_bit_exact_set_covers_the_llama_cpp_types():
    names = {t.name for t in BOTH}
    assert {"F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
            "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"} <= names


# llama.cpp builds search tables on the first use of these (seconds each): slow.
_SLOW_INIT = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S"}


def _bit_exact_cases():
    from ggml_probe.weights.dequant import _lib

    for qtype in BOTH:
        marks = [pytest.mark.slow] if qtype.name in _SLOW_INIT else []
        yield pytest.param(qtype, True, marks=marks, id=f"{qtype.name}-imatrix")
        if not _lib().ggml_quantize_requires_imatrix(int(qtype)):
            yield pytest.param(qtype, False, marks=marks, id=f"{qtype.name}-plain")


@pytest.mark.parametrize("qtype, with_imatrix", list(_bit_exact_cases()))
def test_ggml_dequantizer_equals_gguf_py_bit_for_bit(qtype, with_imatrix):
    x = _test_matrix(seed=int(qtype))
    imatrix = np.random.default_rng(1).uniform(0.05, 4.0, x.shape[1]).astype(np.float32) if with_imatrix else None
    blocks = quantize_rows(x, qtype, imatrix)
    facts = type_facts(qtype)
    assert blocks.shape == (x.shape[0], x.shape[1] // facts.block_size * facts.type_size)

    by_ggml = dequantize_bytes(blocks, qtype, x.size, backend="ggml")
    by_gguf_py = gguf.quants.dequantize(blocks, qtype).astype(np.float32).reshape(-1)
    assert by_ggml.dtype == np.float32 and by_gguf_py.shape == by_ggml.shape
    assert np.array_equal(by_ggml.view(np.uint32), by_gguf_py.view(np.uint32))  # identical bits, NaN-safe
    # ...and the values are a real reconstruction of the input, not an agreement on garbage.
    rel = np.linalg.norm(by_ggml - x.ravel()) / np.linalg.norm(x)
    assert rel < _bound(qtype.name), (qtype.name, rel)
    assert np.all(by_ggml.reshape(x.shape)[0] == 0.0)  # the zero row stays zero


def test_streamed_file_reads_equal_whole_buffer_dequantization(tmp_path):
    """Tensors of many types in one GGUF file, read back in blocks of a few rows through the mmap."""
    x = _test_matrix(rows=12, cols=512, seed=3)
    im = np.ones(512, dtype=np.float32)
    types = [QT.Q4_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q4_K, QT.Q6_K, QT.IQ3_S, QT.IQ4_NL, QT.BF16, QT.F16]
    blocks = {f"blk.0.t{int(t)}.weight": (quantize_rows(x, t, im), t) for t in types}
    path = _write_gguf(tmp_path / "mixed.gguf", {**blocks, "blk.0.f32.weight": x})

    reader = gguf.GGUFReader(path)  # the independent path: gguf-py's reader + NumPy dequantizer
    with GGUFTensors(path) as g:
        for t in reader.tensors:
            ref = g.ref(t.name)
            assert ref.numpy_shape == x.shape and ref.ggml_shape == tuple(int(d) for d in t.shape)
            expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(x.shape).astype(np.float32)
            got = np.concatenate([b.copy() for _, b in g.iter_rows(t.name, block_elements=5 * 512)])
            assert np.array_equal(got, expected), t.name
            assert np.array_equal(g.dequantize(t.name), expected)
            if t.name in blocks:
                assert np.array_equal(np.asarray(g.raw(t.name)), blocks[t.name][0])
        assert np.array_equal(g.dequantize("blk.0.f32.weight"), x)


@pytest.mark.slow
def test_every_tensor_of_a_real_k_quant_file_matches_gguf_py(demo_ladder):
    """llama.cpp's Q4_K_M of the demo model mixes Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors."""
    seen = set()
    with GGUFTensors(demo_ladder["Q4_K_M"]) as g:
        for name, ref in g.tensors.items():
            seen.add(ref.type_name)
            raw = g.raw(name)
            expected = gguf.quants.dequantize(np.asarray(raw), QT(ref.ggml_type)).astype(np.float32)
            assert np.array_equal(g.dequantize(name), expected.reshape(ref.numpy_shape)), name
    assert {"Q4_K", "Q6_K", "F32"} <= seen


# ---------------------------------------------------------------------------------------------
# (b) per-tensor and per-neuron figures against a direct NumPy computation

N_EMBD, N_FF = 64, 96


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """A two-layer F32 reference and its Q4_0 copy (quantized by llama.cpp), plus the arrays."""
    d = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(7)
    ref, model = {}, {}
    for layer in range(2):
        shapes = {"ffn_gate": (N_FF, N_EMBD), "ffn_up": (N_FF, N_EMBD), "ffn_down": (N_EMBD, N_FF),
                  "attn_q": (N_EMBD, N_EMBD)}
        for kind, shape in shapes.items():
            w = (rng.standard_normal(shape) * rng.uniform(0.01, 1.0, (shape[0], 1))).astype(np.float32)
            if kind == "ffn_down":
                w[:, 5] *= 30.0  # neuron 5's output weights: a column with large values
            name = f"blk.{layer}.{kind}.weight"
            ref[name] = w
            model[name] = (quantize_rows(w, QT.Q4_0), QT.Q4_0)
        ref[f"blk.{layer}.ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        model[f"blk.{layer}.ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    dequantized = {n: gguf.quants.dequantize(v[0], v[1]).astype(np.float64) if isinstance(v, tuple) else v
                   for n, v in model.items()}
    return {
        "ref_path": _write_gguf(d / "ref-F32.gguf", ref, block_count=2),
        "model_path": _write_gguf(d / "model-Q4_0.gguf", model, block_count=2),
        "ref": {n: v.astype(np.float64) for n, v in ref.items()},
        "model": dequantized,
        "dir": d,
    }


def _direct(w: np.ndarray, r: np.ndarray, axis) -> dict[str, np.ndarray]:
    d = w - r
    return {
        "rel_rmse": np.sqrt((d * d).sum(axis=axis) / (r * r).sum(axis=axis)),
        "max_abs": np.abs(d).max(axis=axis),
        "cosine": (w * r).sum(axis=axis) / np.sqrt((w * w).sum(axis=axis) * (r * r).sum(axis=axis)),
        "sqnr_db": 10 * np.log10((r * r).sum(axis=axis) / (d * d).sum(axis=axis)),
    }


@pytest.mark.parametrize("block_elements", [1 << 22, 3 * N_FF], ids=["one-block", "many-blocks"])
def test_per_tensor_and_per_neuron_figures_match_numpy(small_pair, block_elements):
    report = compare_weights(small_pair["model_path"], small_pair["ref_path"], block_elements=block_elements)
    assert [t.name for t in report.tensors] == [n for n in small_pair["ref"] if "norm" not in n]
    for t in report.tensors:
        w, r = small_pair["model"][t.name], small_pair["ref"][t.name]
        whole = _direct(w, r, axis=None)
        for key in ("rel_rmse", "cosine", "sqnr_db", "max_abs"):
            assert getattr(t, key) == pytest.approx(float(whole[key]), rel=1e-9), (t.name, key)
        # ffn_down (ggml [n_ff, n_embd], NumPy (n_embd, n_ff)): a neuron is a COLUMN; else a row.
        axis = 0 if t.kind == "ffn_down" else 1
        assert t.unit_axis == ("column" if axis == 0 else "row")
        per_unit = _direct(w, r, axis=axis)
        assert len(t.units["rel_rmse"]) == (N_FF if t.kind.startswith("ffn") else N_EMBD)
        for key, expected in per_unit.items():
            np.testing.assert_allclose(t.units[key], expected, rtol=1e-9, atol=0, err_msg=f"{t.name} {key}")

    # A neuron's pooled figure: its gate row, up row and down column together.
    for layer in (0, 1):
        m, r = small_pair["model"], small_pair["ref"]
        g, u, dn = (f"blk.{layer}.{k}.weight" for k in ("ffn_gate", "ffn_up", "ffn_down"))
        dd = ((m[g] - r[g]) ** 2).sum(1) + ((m[u] - r[u]) ** 2).sum(1) + ((m[dn] - r[dn]) ** 2).sum(0)
        rr = (r[g] ** 2).sum(1) + (r[u] ** 2).sum(1) + (r[dn] ** 2).sum(0)
        pooled = np.sqrt(dd / rr)
        for n in report.top_neurons:
            if n.layer == layer:
                assert n.rel_rmse == pytest.approx(pooled[n.index], rel=1e-9)
    best = max(((layer, i) for layer in (0, 1) for i in range(N_FF)), key=lambda li: _pooled(small_pair, *li))
    assert (report.top_neurons[0].layer, report.top_neurons[0].index) == best

    # Layer summary: pooled over the layer's four matrices.
    for s in report.layers:
        names = [t.name for t in report.tensors if t.layer == s.layer]
        dd = sum(((small_pair["model"][n] - small_pair["ref"][n]) ** 2).sum() for n in names)
        rr = sum((small_pair["ref"][n] ** 2).sum() for n in names)
        assert s.rel_rmse == pytest.approx(math.sqrt(dd / rr), rel=1e-9)
        assert s.n_tensors == 4

    text = format_report(report, top_k=3)
    top = report.top_neurons[0]
    assert f"  {top.layer}:{top.index}  {top.rel_rmse:.4f}" in text and "most hurt layers: " in text

    doc = json.loads(report.to_json())
    first = report.tensors[0]
    w, r = small_pair["model"][first.name], small_pair["ref"][first.name]
    np.testing.assert_allclose(doc["tensors"][0]["units"]["rel_rmse"],
                               _direct(w, r, axis=0 if first.kind == "ffn_down" else 1)["rel_rmse"], rtol=1e-9)
    assert len(doc["top_neurons"]) == 10 and doc["architecture"] == "llama"


def _pooled(pair, layer, i) -> float:
    m, r = pair["model"], pair["ref"]
    g, u, dn = (f"blk.{layer}.{k}.weight" for k in ("ffn_gate", "ffn_up", "ffn_down"))
    dd = ((m[g][i] - r[g][i]) ** 2).sum() + ((m[u][i] - r[u][i]) ** 2).sum() + ((m[dn][:, i] - r[dn][:, i]) ** 2).sum()
    rr = (r[g][i] ** 2).sum() + (r[u][i] ** 2).sum() + (r[dn][:, i] ** 2).sum()
    return float(np.sqrt(dd / rr))


def test_selection_by_layers_and_patterns(small_pair):
    with GGUFTensors(small_pair["model_path"]) as g:
        assert select_tensors(g, [-1], "ffn_down") == ["blk.1.ffn_down.weight"]
        assert select_tensors(g, "0", "attn_*,ffn_up") == ["blk.0.ffn_up.weight", "blk.0.attn_q.weight"]
        assert select_tensors(g, "all", "ffn_norm") == ["blk.0.ffn_norm.weight", "blk.1.ffn_norm.weight"]
        assert len(select_tensors(g)) == 8  # matrices only by default
        assert len(select_tensors(g, None, "ffn_*")) == 6  # wildcards too: no ffn_norm
    assert parse_layer_spec("0,2-4,-1") == [0, 2, 3, 4, -1]


def test_identical_files_have_zero_error_and_null_sqnr_in_json(small_pair):
    report = compare_weights(small_pair["ref_path"], small_pair["ref_path"], tensors="ffn_up")
    t = report.tensors[0]
    assert t.rel_rmse == 0.0 and t.max_abs == 0.0 and t.sqnr_db == math.inf
    assert t.cosine == pytest.approx(1.0, abs=1e-12)
    doc = json.loads(report.to_json())  # strict JSON: inf becomes null
    assert doc["tensors"][0]["sqnr_db"] is None and doc["total"]["rel_rmse"] == 0.0


# ---------------------------------------------------------------------------------------------
# (c) a real property on the demo ladder


@pytest.mark.slow
def test_q8_0_is_closer_to_f16_than_q4_0_in_every_layer(demo_ladder):
    kw = dict(tensors="ffn_*,attn_*")
    q8 = compare_weights(demo_ladder["Q8_0"], demo_ladder["F16"], **kw)
    q4 = compare_weights(demo_ladder["Q4_0"], demo_ladder["F16"], **kw)
    assert len(q8.layers) == len(q4.layers) == 30
    for a, b in zip(q8.layers, q4.layers):
        assert a.layer == b.layer
        assert a.rel_rmse < b.rel_rmse / 4, (a.layer, a.rel_rmse, b.rel_rmse)
        assert a.sqnr_db > b.sqnr_db + 12  # 4 more bits: about 6 dB each in theory
    assert 0.03 < q4.total["rel_rmse"] < 0.2 and q8.total["rel_rmse"] < 0.02
    # ffn_down (ggml [n_ff, n_embd]) has one figure per neuron: n_ff = 1536 of them.
    down = q4.tensor("blk.0.ffn_down.weight")
    assert down.ggml_shape == (1536, 576) and len(down.units["rel_rmse"]) == 1536


# ---------------------------------------------------------------------------------------------
# (d) bad input


def test_different_architectures_are_refused(small_pair):
    other = _write_gguf(small_pair["dir"] / "other-arch.gguf",
                        {"blk.0.ffn_up.weight": small_pair["ref"]["blk.0.ffn_up.weight"]}, arch="qwen2")
    with pytest.raises(ProbeError, match=r"architecture mismatch: .*'qwen2'.*'llama'"):
        compare_weights(other, small_pair["ref_path"])


def test_different_shapes_are_refused_naming_the_tensor(small_pair):
    wrong = dict(small_pair["ref"])
    wrong["blk.1.ffn_up.weight"] = np.zeros((N_FF, N_EMBD * 2), dtype=np.float32)
    path = _write_gguf(small_pair["dir"] / "wrong-shape.gguf",
                       {k: v.astype(np.float32) for k, v in wrong.items()}, block_count=2)
    with pytest.raises(ProbeError, match=r"shape mismatch for blk\.1\.ffn_up\.weight: \[128, 96\] .* \[64, 96\]"):
        compare_weights(path, small_pair["ref_path"])


def test_unknown_names_suggest_close_matches(small_pair):
    with pytest.raises(ProbeError, match=r"no tensor named 'ffn_dwn'; did you mean ffn_down"):
        compare_weights(small_pair["model_path"], small_pair["ref_path"], tensors="ffn_dwn")
    with pytest.raises(ProbeError, match=r"pattern 'mlp_\*' matches no tensor; names are: attn_q, ffn_down"):
        compare_weights(small_pair["model_path"], small_pair["ref_path"], tensors="mlp_*")
    with pytest.raises(ProbeError, match=r"layer 5 out of range: the model has 2 layers"):
        compare_weights(small_pair["model_path"], small_pair["ref_path"], layers=[5])
    with pytest.raises(ProbeError, match=r"did you mean blk\.1\.ffn_down\.weight"):
        dump_tensors(small_pair["model_path"], "blk.1.ffn_dwn.weight", small_pair["dir"] / "x.npy")


def test_undequantizable_types_are_named(small_pair):
    q8k = type_facts(QT.Q8_K)
    assert not can_dequantize(QT.Q8_K)  # neither ggml (no to_float) nor gguf-py has one
    blocks = np.zeros((N_FF, N_EMBD * 4 // q8k.block_size * q8k.type_size), dtype=np.uint8)
    path = _write_gguf(small_pair["dir"] / "q8k.gguf", {"blk.0.ffn_up.weight": (blocks, QT.Q8_K)}, block_count=1)
    ref = _write_gguf(small_pair["dir"] / "q8k-ref.gguf",
                      {"blk.0.ffn_up.weight": np.zeros((N_FF, N_EMBD * 4), np.float32)}, block_count=1)
    with pytest.raises(ProbeError, match=r"cannot dequantize 1 tensor.*blk\.0\.ffn_up\.weight \(Q8_K in q8k\.gguf\)"):
        compare_weights(path, ref)
    with pytest.raises(ProbeError, match=r"cannot dequantize blk\.0\.ffn_up\.weight \(Q8_K\)"):
        dump_tensors(path, "blk.0.ffn_up.weight", small_pair["dir"] / "q8k.npy", dequantize=True)
    # Raw export needs no dequantizer.
    out = dump_tensors(path, "blk.0.ffn_up.weight", small_pair["dir"] / "q8k-raw.npy")
    assert np.array_equal(np.load(out.path), blocks)


def test_tensor_missing_from_the_reference_is_refused(small_pair):
    partial = {k: v.astype(np.float32) for k, v in small_pair["ref"].items() if "attn_q" not in k}
    path = _write_gguf(small_pair["dir"] / "no-attn.gguf", partial, block_count=2)
    with pytest.raises(ProbeError, match=r"blk\.0\.attn_q\.weight is in model-Q4_0\.gguf but not in the reference"):
        compare_weights(small_pair["model_path"], path)


# ---------------------------------------------------------------------------------------------
# dumps


def test_dump_round_trips_npy_and_safetensors(small_pair):
    st = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    d, src = small_pair["dir"], small_pair["model_path"]
    name = "blk.1.ffn_down.weight"
    reader = gguf.GGUFReader(src)
    stored = next(t for t in reader.tensors if t.name == name)

    deq = dump_tensors(src, name, d / "down.npy", dequantize=True)
    back = np.load(deq.path)
    assert back.dtype == np.float32 and back.shape == (N_EMBD, N_FF)
    assert np.array_equal(back, small_pair["model"][name].astype(np.float32))
    assert json.loads(deq.sidecar.read_text())["ggml_shape"] == [N_FF, N_EMBD]

    raw = dump_tensors(src, name, d / "down-raw.npy")
    assert np.array_equal(np.load(raw.path), np.asarray(stored.data))
    side = json.loads(raw.sidecar.read_text())
    assert side["ggml_type"] == "Q4_0" and side["dtype"] == "uint8"

    both = dump_tensors(src, [name, "blk.0.ffn_up.weight"], d / "two.safetensors", dequantize=True)
    loaded = st.load_file(str(both.path))
    assert np.array_equal(loaded[name], back)
    assert np.array_equal(loaded["blk.0.ffn_up.weight"], small_pair["model"]["blk.0.ffn_up.weight"].astype(np.float32))

    raw_st = dump_tensors(src, name, d / "raw.safetensors")
    assert np.array_equal(st.load_file(str(raw_st.path))[name], np.asarray(stored.data))
    with safe_open(str(raw_st.path), "np") as f:
        meta = f.metadata()
    assert meta[f"{name}.ggml_type"] == "Q4_0" and json.loads(meta[f"{name}.ggml_shape"]) == [N_FF, N_EMBD]
    # Decoding the exported raw blocks gives the dequantized export.
    blocks_back = st.load_file(str(raw_st.path))[name]
    assert np.array_equal(dequantize_bytes(blocks_back, QT.Q4_0, back.size).reshape(back.shape), back)

    with pytest.raises(OutputExists):
        dump_tensors(src, name, d / "down.npy")
    with pytest.raises(ProbeError, match=r"\.npy holds one tensor"):
        dump_tensors(src, [name, "blk.0.ffn_up.weight"], d / "two.npy")
    with pytest.raises(ProbeError, match=r"must end in \.npy or \.safetensors"):
        dump_tensors(src, name, d / "down.pt")
    assert not list(d.glob(".*partial*"))
