"""The quantization ladder: llama.cpp's own quantizer, real files, what llama.cpp then loads."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from ggml_probe.engine.model import Engine
from ggml_probe.errors import OutputExists, ProbeError, UnknownQuant
from ggml_probe.models.ggufinfo import inspect_gguf
from ggml_probe.models.quant_types import QUANT_TYPES, ftype_name, normalize_quant
from ggml_probe.models.quantize import ladder_path, ladder_stem, quantize_ladder


def test_quant_registry_matches_llama_cpp_constants():
    import llama_cpp

    for name, ftype in QUANT_TYPES.items():
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        if hasattr(llama_cpp, const):
            assert getattr(llama_cpp, const) == ftype, name
    # The ladder's usual rungs must all be known to the installed llama.cpp.
    for name in ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_NL", "Q3_K_M", "Q2_K"):
        assert hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")


def test_normalize_quant_and_unknown_names():
    assert normalize_quant("q4_k_m") == "Q4_K_M"
    assert normalize_quant("q8-0") == "Q8_0"
    with pytest.raises(UnknownQuant) as err:
        normalize_quant("Q4_K_X")
    msg = str(err.value)
    assert "\n" not in msg and "Q4_K_M" in msg and "valid:" in msg
    assert ftype_name(15) == "Q4_K_M" and ftype_name(1024 | 2) == "Q4_0"


def test_ladder_naming(tmp_path):
    from pathlib import Path

    assert ladder_stem(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert ladder_stem(Path("model-f16.gguf")) == "model"
    assert ladder_path(Path("x/model-F16.gguf"), "q4_k_m", tmp_path) == tmp_path / "model-Q4_K_M.gguf"


def _llama_loaded_types(path) -> dict[str, int]:
    """What llama.cpp's loader reports it holds ('- type q4_0: 210 tensors' lines of its log)."""
    with Engine(path, n_ctx=64, hidden_states=False) as engine:
        return engine.loaded_tensor_types


def test_demo_ladder_files_hold_what_llama_cpp_loads(demo_ladder):
    sizes = {}
    for quant, path in demo_ladder.items():
        info = inspect_gguf(path)
        assert path.name == f"SmolLM2-135M-Instruct-{quant}.gguf"
        assert info.file_type == quant
        assert info.metadata["ggml_probe.requantized_from"] == "Q4_1"
        assert _llama_loaded_types(path) == info.tensor_types, quant
        sizes[quant] = info.size_bytes
        # bits per weight is computed from the tensor bytes: check it against gguf-py's block table
        total_bits = sum(
            8 * t.n_elements // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type]][0]
            * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type]][1]
            for t in info.tensors
        )
        assert info.bits_per_weight == pytest.approx(total_bits / info.n_params)
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q4_K_M"] > sizes["Q4_0"]
    # SmolLM2-135M's 576-wide rows do not fit K-quant blocks of 256: llama.cpp falls back.
    q4km = inspect_gguf(demo_ladder["Q4_K_M"]).tensor_types
    assert "Q5_0" in q4km and q4km.get("Q4_K", 0) < 50


def test_requantize_needs_the_flag_and_outputs_are_not_overwritten(demo_path, demo_ladder, tmp_path):
    with pytest.raises(ProbeError, match="already quantized \\(Q4_1\\).*--allow-requantize"):
        quantize_ladder(demo_path, ["Q8_0"], out_dir=tmp_path)
    assert not list(tmp_path.iterdir())
    out_dir = demo_ladder["F16"].parent
    before = demo_ladder["Q8_0"].stat().st_mtime_ns
    with pytest.raises(OutputExists, match="--force"):
        quantize_ladder(demo_path, ["Q8_0"], out_dir=out_dir, allow_requantize=True)
    assert demo_ladder["Q8_0"].stat().st_mtime_ns == before
    kept = quantize_ladder(demo_path, ["Q8_0"], out_dir=out_dir, allow_requantize=True, skip_existing=True)
    assert kept[0].skipped and demo_ladder["Q8_0"].stat().st_mtime_ns == before


def test_quantize_from_f16_needs_no_flag_and_keeps_provenance(demo_ladder, tmp_path):
    # F16 is not quantized, so no --allow-requantize; but it was dequantized from Q4_1, and says so.
    res = quantize_ladder(demo_ladder["F16"], ["Q8_0"], out_dir=tmp_path)
    assert res[0].requantized_from == "Q4_1"
    assert res[0].info.metadata["ggml_probe.requantized_from"] == "Q4_1"
    # The F16 rung rounded the Q4_1 values to half precision, so this Q8_0 differs slightly from the
    # direct Q4_1→Q8_0 one, by far less than Q8_0's own rounding error.
    a = gguf.GGUFReader(res[0].path).get_tensor(5)
    b = gguf.GGUFReader(demo_ladder["Q8_0"]).get_tensor(5)
    assert a.name == b.name == "blk.0.attn_q.weight"
    wa = gguf.quants.dequantize(np.asarray(a.data), a.tensor_type)
    wb = gguf.quants.dequantize(np.asarray(b.data), b.tensor_type)
    assert np.linalg.norm(wa - wb) / np.linalg.norm(wb) < 2e-3
    assert not np.array_equal(wa, wb)


def test_failed_quantize_leaves_no_partial_file(demo_ladder, tmp_path):
    with pytest.raises(ProbeError, match="importance matrix"):
        quantize_ladder(demo_ladder["F16"], ["IQ2_XXS"], out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_quant_is_refused_before_any_work(demo_ladder, tmp_path):
    with pytest.raises(UnknownQuant):
        quantize_ladder(demo_ladder["F16"], ["Q8_0", "Q4_Z"], out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
