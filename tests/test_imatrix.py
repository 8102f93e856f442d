"""llama.cpp importance matrices: GGUF and legacy formats, and the quantizer really using them."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from ggml_probe.errors import ProbeError
from ggml_probe.formats.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix
from ggml_probe.models.quantize import quantize_ladder


def _demo_like_imatrix(seed: int = 0) -> Imatrix:
    rng = np.random.default_rng(seed)
    entries = {}
    for layer in range(30):
        for name, width in (("ffn_gate", 576), ("ffn_up", 576), ("ffn_down", 1536), ("attn_q", 576),
                            ("attn_k", 576), ("attn_v", 576), ("attn_output", 576)):
            sums = rng.gamma(0.5, 4.0, size=(1, width)) * 100.0
            entries[f"blk.{layer}.{name}.weight"] = ImatrixEntry(sums, np.array([100.0]))
    return Imatrix(entries, datasets=["test prompts"], chunk_count=3, chunk_size=512)


def test_gguf_imatrix_round_trip(tmp_path):
    im = _demo_like_imatrix()
    path = write_imatrix(tmp_path / "im.gguf", im)
    back = read_imatrix(path)
    assert back.datasets == ["test prompts"] and back.chunk_count == 3 and back.chunk_size == 512
    assert set(back.entries) == set(im.entries)
    name = "blk.3.ffn_down.weight"
    assert np.allclose(back.entries[name].sums, im.entries[name].sums.astype(np.float32))
    # the layout llama-imatrix writes: <name>.in_sum2 [n_per_row, n_mat] and <name>.counts [1, n_mat], F32
    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    assert list(t[f"{name}.in_sum2"].shape) == [1536, 1] and list(t[f"{name}.counts"].shape) == [1, 1]
    assert r.fields["general.type"].contents() == "imatrix"
    ms = back.mean_squares()[name]
    assert ms.dtype == np.float32 and np.allclose(ms, im.entries[name].sums[0] / 100.0, rtol=1e-6)


def test_legacy_dat_is_read(tmp_path):
    values = np.arange(1, 9, dtype=np.float32)
    name = b"blk.0.ffn_up.weight"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 8) + values.tobytes()
    blob += struct.pack("<i", 7) + struct.pack("<i", 5) + b"wiki!"
    (tmp_path / "old.dat").write_bytes(blob)
    im = read_imatrix(tmp_path / "old.dat")
    assert im.legacy and im.chunk_count == 7 and im.datasets == ["wiki!"]
    assert np.allclose(im.mean_squares()["blk.0.ffn_up.weight"], values / 4)


def test_a_matrix_that_counted_nothing_weighs_one_per_channel(tmp_path):
    """An expert no token was routed to (count 0): llama-quantize's load_imatrix (tools/quantize) hands the
    quantizer ones for its channels, not 0/1 = zeros; the routed experts get their mean squares."""
    sums = np.array([[2.0, 4.0, 6.0], [0.0, 0.0, 0.0], [3.0, 3.0, 9.0]])
    im = Imatrix({"blk.0.ffn_down_exps.weight": ImatrixEntry(sums, np.array([2.0, 0.0, 3.0]))})
    back = read_imatrix(write_imatrix(tmp_path / "experts.gguf", im))
    assert back.mean_squares()["blk.0.ffn_down_exps.weight"].tolist() == [1, 2, 3, 1, 1, 1, 1, 1, 3]


def test_not_an_imatrix(tmp_path):
    (tmp_path / "x.dat").write_bytes(b"\xff\xff\xff\xff garbage")
    with pytest.raises(ProbeError, match="not an imatrix file"):
        read_imatrix(tmp_path / "x.dat")


@pytest.mark.slow
def test_quantizer_uses_the_imatrix(demo_ladder, tmp_path):
    im = _demo_like_imatrix()
    plain = quantize_ladder(demo_ladder["F16"], ["IQ4_NL"], out_dir=tmp_path / "plain")[0]
    weighted = quantize_ladder(demo_ladder["F16"], ["IQ4_NL"], out_dir=tmp_path / "im",
                               imatrix=im.mean_squares())[0]
    a = {t.name: t for t in gguf.GGUFReader(plain.path).tensors}
    b = {t.name: t for t in gguf.GGUFReader(weighted.path).tensors}
    name = "blk.5.ffn_down.weight"
    assert a[name].tensor_type == b[name].tensor_type
    assert not np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data))
    # The imatrix weights each input column's error: the weighted quantizer must lower the
    # importance-weighted error on this tensor against the unweighted one.
    ref_t = {t.name: t for t in gguf.GGUFReader(demo_ladder["F16"]).tensors}[name]
    w = gguf.quants.dequantize(np.asarray(ref_t.data), ref_t.tensor_type).astype(np.float64)
    imp = im.mean_squares()[name].astype(np.float64)

    def weighted_err(t):
        q = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        return float((((q - w) ** 2) * imp[None, :]).sum())

    assert weighted_err(b[name]) < weighted_err(a[name])


def _foreign(tmp_path, entries: dict[str, int], name: str):
    return write_imatrix(tmp_path / name, Imatrix({n: ImatrixEntry(np.ones((1, w)), np.array([1.0]))
                                                    for n, w in entries.items()}))


def test_an_imatrix_of_another_model_is_refused(demo_ladder, tmp_path):
    from click.testing import CliRunner

    from ggml_probe.cli import cli

    src = demo_ladder["F16"]
    wide = _foreign(tmp_path, {"blk.0.ffn_gate.weight": 576, "blk.0.ffn_down.weight": 8192}, "wide.gguf")
    with pytest.raises(ProbeError, match=r"^imatrix wide.gguf is for another model: blk.0.ffn_down.weight has "
                                         r"8192 values, the model's rows have 1536$"):
        quantize_ladder(src, ["Q4_0"], out_dir=tmp_path / "q", imatrix=wide)
    deep = _foreign(tmp_path, {f"blk.{i}.ffn_up.weight": 576 for i in range(28, 34)}, "deep.gguf")
    with pytest.raises(ProbeError, match=r"is for another model: SmolLM2-135M-Instruct-F16.gguf has no tensor "
                                         r"blk.30.ffn_up.weight, blk.31.ffn_up.weight, blk.32.ffn_up.weight and 1 more$"):
        quantize_ladder(src, ["Q4_0"], out_dir=tmp_path / "q", imatrix=deep)
    # the API with a mapping (what Imatrix.mean_squares() gives) is checked too
    with pytest.raises(ProbeError, match=r"^the imatrix is for another model: blk.3.attn_q.weight has 4 values"):
        quantize_ladder(src, ["Q4_0"], out_dir=tmp_path / "q", imatrix={"blk.3.attn_q.weight": np.ones(4, np.float32)})
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())  # refused before any work

    res = CliRunner().invoke(cli, ["quantize", str(src), "--to", "Q4_0", "-o", str(tmp_path / "q"), "--imatrix", str(wide)])
    assert res.exit_code == 2
    assert res.output.strip() == ("Error: imatrix wide.gguf is for another model: blk.0.ffn_down.weight has 8192 "
                                  "values, the model's rows have 1536")
