"""An importance matrix collected from prompts equals llama-imatrix's rule, and llama.cpp's quantizer takes it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ggml_probe.engine.probes import TensorReader
from ggml_probe.engine.ggml_lib import libggml, tensor_head
from ggml_probe.engine.imatrix_capture import collect_imatrix
from ggml_probe.engine.model import Engine
from ggml_probe.formats.imatrix import read_imatrix, write_imatrix
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
    lib, reader = libggml(), TensorReader()
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


class _Interrupted(Exception):
    pass


def test_eval_writes_the_same_imatrix_in_its_own_pass_and_resumes(demo_ladder, boolq_path, tmp_path):
    from dataclasses import replace

    from ggml_probe.errors import ProbeError
    from ggml_probe.pipeline.evaluation import EvalConfig, NeuronSettings, evaluate, task_spec
    from ggml_probe.tasks import load_examples

    path, out = demo_ladder["F16"], tmp_path / "run.imatrix.gguf"
    # neurons ride along on layer 0 only: without the imatrix the last layer would be cut to the answer rows
    # one prompt per decode, as llama-imatrix's reference here decodes them: the sums are compared exactly
    config = EvalConfig(task="boolq", data_path=str(boolq_path), limit=5, threads=1, chunk_size=2, n_boot=10, batch_prompts=1,
                        state_every_s=0,
                        neurons=NeuronSettings(layers="0", definitions=("act",), redundancy=False, top_k=0),
                        imatrix_out=str(out))

    def stop_after_first_chunk(done, total):
        if done == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        evaluate(path, config, tmp_path / "run", progress=stop_after_first_chunk)
    assert not out.exists() and (tmp_path / "run" / "imatrix_state").is_dir()
    summary = evaluate(path, config, tmp_path / "run", resume=True)
    assert summary.resumed_examples == 2
    assert summary.manifest["imatrix"]["path"] == str(out.resolve()) and summary.manifest["imatrix"]["prompts"] == 5

    data = load_examples(task_spec(config), data_path=config.data_path, limit=5)
    ref = collect_imatrix(path, [ex.prompt for ex in data.examples], n_threads=1)
    got = read_imatrix(out)
    assert set(got.entries) == set(ref.entries) and len(got.entries) == 30 * 7 and got.chunk_count == 5
    # the run's manifest (as on disk) describes that file: its matrices and every prompt token
    recorded = json.loads((tmp_path / "run" / "manifest.json").read_text())["imatrix"]
    assert recorded["entries"] == 30 * 7 and recorded["tokens"] == ref.entries["blk.0.attn_q.weight"].counts[0]
    for name, e in ref.entries.items():  # every token of every prompt, last layer included, counted once
        assert got.entries[name].counts[0] == e.counts[0], name
        np.testing.assert_array_equal(got.entries[name].sums, e.sums.astype(np.float32), err_msg=name)

    # the neuron statistics of the same pass are those of a run without the imatrix
    plain = evaluate(path, replace(config, imatrix_out=None), tmp_path / "plain")
    with np.load(tmp_path / "run" / "neuron_stats.npz") as a, np.load(plain.run_dir / "neuron_stats.npz") as b:
        for k in b.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert summary.metrics["label_set"]["accuracy"] == plain.metrics["label_set"]["accuracy"]

    # a finished run asked again rebuilds a removed file from its saved sums
    out.unlink()
    evaluate(path, config, tmp_path / "run", resume=True)
    np.testing.assert_array_equal(read_imatrix(out).entries["blk.29.ffn_down.weight"].sums,
                                  ref.entries["blk.29.ffn_down.weight"].sums.astype(np.float32))
    # the sums must cover every example: resuming without the option is refused
    with pytest.raises(ProbeError, match=r"different settings \(imatrix\)"):
        evaluate(path, replace(config, imatrix_out=None), tmp_path / "run", resume=True)


def test_imatrix_collect_fits_long_prompts_as_eval_does(demo_path, boolq_path, tmp_path):
    """At --ctx 64 every BoolQ passage prompt must be cut: `imatrix collect` fits each as an eval run
    does (the template kept, the passage cut), so its matrix is the one the eval pass of the same task
    and context writes. Prompts handed to the engine unfitted are refused, never cut from the left."""
    import pandas as pd

    from ggml_probe.errors import ProbeError
    from ggml_probe.pipeline.evaluation import EvalConfig, evaluate
    from ggml_probe.pipeline.imatrix import collect_task_imatrix

    template = "Respond with True or False only.\nPassage: {passage}\nQuestion: {question}?\nAnswer:"
    out = tmp_path / "eval.imatrix.gguf"
    config = EvalConfig(task="boolq-passage-short", data_path=str(boolq_path), template=template,
                        labels=("True", "False"), gold_column="label", id_column="idx", limit=2, n_ctx=64,
                        threads=1, n_boot=10, imatrix_out=str(out), batch_prompts=1)  # as collect_task_imatrix
    summary = evaluate(demo_path, config, tmp_path / "run")
    assert (pd.read_parquet(summary.run_dir / "predictions.parquet")["truncated_tokens"] > 0).all()

    im, data = collect_task_imatrix(demo_path, config)
    got = read_imatrix(out)
    assert set(im.entries) == set(got.entries) and im.chunk_count == 2
    for name, e in im.entries.items():
        assert got.entries[name].counts[0] == e.counts[0], name
        np.testing.assert_array_equal(got.entries[name].sums, e.sums.astype(np.float32), err_msg=name)

    with pytest.raises(ProbeError, match="fit it first"):
        collect_imatrix(demo_path, [ex.prompt for ex in data.examples], n_ctx=64, n_threads=1)
