"""An importance matrix collected from prompts equals llama-imatrix's rule, and llama.cpp's quantizer takes it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ggml_probe.engine.capture import _TensorReader
from ggml_probe.engine.ggml_lib import libggml, tensor_head
from ggml_probe.engine.imatrix_capture import collect_imatrix
from ggml_probe.engine.model import Engine
from ggml_probe.models.imatrix import read_imatrix, write_imatrix
from ggml_probe.models.quantize import quantize_ladder


@pytest.fixture(scope="module")
def prompts(boolq_path):
    rows = [json.loads(line) for line in boolq_path.open()][:3]
    return [f"Respond with True or False only.\n{r['question']}\nAnswer:" for r in rows]


@pytest.mark.slow
def test_collected_imatrix_equals_the_mul_mat_rule(demo_ladder, prompts, tmp_path):
    path = demo_ladder["F16"]
    im = collect_imatrix(path, prompts, datasets=["boolq"], n_threads=1)
    assert len(im.entries) == 30 * 7  # q, k, v, output, gate, up, down in every layer

    # llama-imatrix's own rule, independent of graph names: every MUL_MAT whose src0 is a blk.* weight,
    # its src1 squared and summed over rows.
    lib, reader = libggml(), _TensorReader()
    ref: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def callback(t, ask):
        head = tensor_head(t)
        if lib.ggml_op_desc(t) != b"MUL_MAT" or not head.src[0]:
            return False
        weight = reader.name(head.src[0])
        if not weight.startswith("blk."):
            return False
        if ask:
            return True
        x = reader.read(head.src[1], "ref").astype(np.float64)
        ref[weight] = ref.get(weight, 0.0) + (x * x).sum(axis=0)
        counts[weight] = counts.get(weight, 0) + x.shape[0]
        return True

    with Engine(path, n_threads=1, hidden_states=False, eval_callback=callback) as engine:
        for p in prompts:
            engine.run([engine.tokenize(p)], all_outputs=True)
    assert set(ref) == set(im.entries)
    for name, entry in im.entries.items():
        np.testing.assert_allclose(entry.sums[0], ref[name], rtol=1e-9, err_msg=name)
        assert entry.counts[0] == counts[name]

    # written in llama.cpp's format, read back, and used by llama.cpp's quantizer
    written = write_imatrix(tmp_path / "boolq.imatrix.gguf", im)
    back = read_imatrix(written)
    assert back.datasets == ["boolq"] and back.chunk_count == 3
    q = quantize_ladder(path, ["IQ4_NL"], out_dir=tmp_path / "q", imatrix=back.mean_squares())[0]
    plain = quantize_ladder(path, ["IQ4_NL"], out_dir=tmp_path / "plain")[0]
    # llama.cpp's IQ4_NL mix lifts the first n_layer/8 ffn_down tensors to Q5_K only when it has no
    # imatrix (llama-quant.cpp): that the lift is gone shows the quantizer received ours.
    assert plain.info.tensor_types.get("Q5_K") == 30 // 8
    assert "Q5_K" not in q.info.tensor_types and q.info.tensor_types["IQ4_NL"] == 210
