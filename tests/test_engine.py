"""The engine against llama.cpp's own high-level API and against the model's weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from ggml_probe.analysis.scoring import label_logits, log_softmax
from ggml_probe.engine.llama_lib import cpu_budget, default_threads
from ggml_probe.engine.model import Engine
from ggml_probe.errors import BadModelFile
from ggml_probe.pipeline.evaluation import label_tokens_for


@pytest.fixture(scope="module")
def boolq_prompts(boolq_path):
    rows = [json.loads(line) for line in boolq_path.open()][:6]
    return [f"Respond with True or False only.\n{r['question']}\nAnswer:" for r in rows]


def test_label_probabilities_equal_llama_cpp_high_level_api(demo_path, boolq_prompts):
    import llama_cpp

    with Engine(demo_path, n_ctx=512) as engine:
        lt = label_tokens_for(engine, ["True", "False"], boolq_prompts[0])
        tokens = [engine.tokenize(p) for p in boolq_prompts]
        ours = np.stack([r.logits for r in engine.run(tokens)])
    ref_model = llama_cpp.Llama(model_path=str(demo_path), n_ctx=512, logits_all=True, verbose=False)
    theirs = []
    for p, toks in zip(boolq_prompts, tokens):
        assert ref_model.tokenize(p.encode(), add_bos=True, special=True) == list(toks)
        ref_model.reset()
        ref_model.eval(list(toks))
        theirs.append(np.array(ref_model.scores[ref_model.n_tokens - 1]))
    theirs = np.stack(theirs)
    p_ours = np.exp(log_softmax(label_logits(ours, lt)))
    p_theirs = np.exp(log_softmax(label_logits(theirs, lt)))
    assert np.abs(p_ours - p_theirs).max() < 1e-4
    assert np.abs(ours - theirs).max() < 1e-3  # same decode path: identical up to float noise
    assert p_ours.std() > 0.001  # the prompts really differ


def test_hidden_state_is_the_final_norm_output(demo_ladder, boolq_prompts):
    """logits = W_out · result_norm (tied embeddings: W_out is token_embd)."""
    path = demo_ladder["F16"]
    with Engine(path, n_ctx=512) as engine:
        res = engine.run([engine.tokenize(p) for p in boolq_prompts[:3]])
    reader = gguf.GGUFReader(path)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    w = gguf.quants.dequantize(np.asarray(emb.data), emb.tensor_type).astype(np.float64)  # (n_vocab, n_embd)
    for r in res:
        assert r.hidden is not None and r.hidden.shape == (576,)
        predicted = w @ r.hidden.astype(np.float64)
        # llama.cpp rounds the hidden state to F16 for this matmul: allow that rounding, no more.
        assert np.abs(predicted - r.logits).max() < 2e-3 * np.abs(r.logits).max()


def test_long_prompts_are_truncated_from_the_left_and_counted(demo_path):
    with Engine(demo_path, n_ctx=32) as engine:
        long = engine.tokenize("one two three four five six seven eight nine ten " * 6)
        assert len(long) > 32
        res = engine.run([long])[0]
        assert res.n_tokens == 32 and res.truncated == len(long) - 32
        direct = engine.run([long[-32:]])[0]
    assert np.array_equal(res.logits, direct.logits)


# Batch-layout noise of the demo F16 on this project's CPU (2 cores, AVX2), measured with
# Engine(n_seq_max=8) against n_seq_max=1 over the first 20 and the first 100 BoolQ questions (the
# paper prompt): max |Δlogit| 0.066, max |Δ label probability| 0.0011, no label or argmax flip; the
# same figures on reruns. (The Q4_1 demo file moves far more: 1.19 and 0.057 over 100 prompts.)
BATCH_NOISE_LOGIT = 0.2  # 3x the measured 0.066
BATCH_NOISE_LABEL_P = 0.005  # 4.5x the measured 0.0011


def test_a_packed_batch_agrees_with_separate_decodes_within_the_layout_noise(demo_ladder, boolq_path):
    """Twenty prompts packed eight to a llama_decode against one prompt per decode, on the F16 file.

    llama.cpp's CPU kernels make a prompt's logits depend on its row offset in a packed batch, so the
    two paths are not bit-identical; the tolerances are the measured noise with a margin (see
    BATCH_NOISE_*). Decisions must agree wherever the label margin exceeds the tolerance.
    """
    rows = [json.loads(line) for line in boolq_path.open()][:20]
    prompts = [f"Respond with True or False only.\n{r['question']}\nAnswer:" for r in rows]
    layouts: dict[int, list[list[int]]] = {}
    logits: dict[int, np.ndarray] = {}
    for n_seq in (1, 8):
        with Engine(demo_ladder["F16"], n_ctx=2048, n_seq_max=n_seq, hidden_states=False) as engine:
            lt = label_tokens_for(engine, ["True", "False"], prompts[0])
            tokens = [engine.tokenize(p) for p in prompts]
            seen: list[list[int]] = []
            res = engine.run(tokens, on_batch=lambda idx, arrays: seen.append(list(idx)))
        layouts[n_seq] = seen
        logits[n_seq] = np.stack([r.logits for r in res])
    # one decode per on_batch call: really packed 8 + 8 + 4, against 20 single decodes
    assert [len(g) for g in layouts[8]] == [8, 8, 4] and sum(layouts[8], []) == list(range(20))
    assert [len(g) for g in layouts[1]] == [1] * 20
    packed, alone = logits[8], logits[1]
    assert np.abs(packed - alone).max() < BATCH_NOISE_LOGIT
    p_packed = np.exp(log_softmax(label_logits(packed, lt)))
    p_alone = np.exp(log_softmax(label_logits(alone, lt)))
    assert np.abs(p_packed - p_alone).max() < BATCH_NOISE_LABEL_P
    # decisions: the same label and the same full-vocabulary argmax, unless the margin is within the noise
    label_margin = np.abs(p_alone[:, 0] - p_alone[:, 1])
    clear = label_margin > 2 * BATCH_NOISE_LABEL_P
    assert np.array_equal(p_packed.argmax(1)[clear], p_alone.argmax(1)[clear])
    top2 = np.sort(alone, axis=1)[:, -2:]
    clear_top = top2[:, 1] - top2[:, 0] > 2 * BATCH_NOISE_LOGIT
    assert np.array_equal(packed.argmax(1)[clear_top], alone.argmax(1)[clear_top])
    assert clear.sum() >= 15 and clear_top.sum() >= 10  # the check covers most prompts


def test_eval_callback_sees_the_graph_and_keeps_logits(demo_path, boolq_prompts):
    from ggml_probe.engine.ggml_lib import libggml

    lib = libggml()
    asked: list[str] = []

    def callback(t: int, ask: bool) -> bool:
        name = lib.ggml_get_name(t).decode()
        if ask:
            asked.append(name)
            return name == "result_output"
        return True

    with Engine(demo_path, n_ctx=512, eval_callback=callback) as engine:
        hooked = engine.run([engine.tokenize(boolq_prompts[0])])[0]
        info = engine.info()
    with Engine(demo_path, n_ctx=512) as engine:
        plain = engine.run([engine.tokenize(boolq_prompts[0])])[0]
    assert {"ffn_gate-0", "ffn_swiglu-29", "l_out-29", "result_output"} <= set(asked)
    assert np.array_equal(hooked.logits, plain.logits)
    assert info.n_layer == 30 and info.n_embd == 576 and info.n_vocab == 49152
    assert any(d["type"] == "CPU" for d in info.devices)


def test_engine_refuses_a_corrupt_file_before_llama_cpp_sees_it(demo_path, tmp_path):
    bad = tmp_path / "bad.gguf"
    data = bytearray(demo_path.read_bytes()[: 5_000_000])
    bad.write_bytes(bytes(data))
    with pytest.raises(BadModelFile, match="truncated"):
        Engine(bad)


def _allowed_cpus_from_status() -> set[int]:
    """The affinity mask as the kernel prints it in /proc/self/status (e.g. '0-3,8')."""
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("Cpus_allowed_list:"))
    cpus: set[int] = set()
    for part in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _root_cgroup_quota() -> int | None:
    """Whole CPUs of the root cgroup's quota (v2 cpu.max or v1 cfs files), None without one."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    if v2.exists():
        quota, period = v2.read_text().split()
        return None if quota == "max" else max(1, int(quota) // int(period))
    v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    if v1.exists():
        quota = int(v1.read_text())
        period = int((v1.parent / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else max(1, quota // period)
    return None


@pytest.mark.skipif(not Path("/proc/self/status").exists() or shutil.which("lscpu") is None,
                    reason="needs Linux's /proc and lscpu")
def test_default_threads_are_the_usable_physical_cores(demo_path):
    """Against the same quantities read another way: the affinity mask from /proc/self/status, the
    physical cores from lscpu, the root cgroup's quota (this project's machines run in the root cgroup)."""
    assert Path("/proc/self/cgroup").read_text().strip().split("\n")[-1].endswith(":/")  # the root cgroup
    allowed = _allowed_cpus_from_status()
    lscpu = subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True, check=True).stdout
    cores = {(sock, core) for cpu, core, sock in (ln.split(",") for ln in lscpu.splitlines() if not ln.startswith("#"))
             if int(cpu) in allowed}
    quota = _root_cgroup_quota()
    expected = min(len(allowed), len(cores), quota or len(allowed))

    budget = cpu_budget()
    assert (budget.allowed, budget.physical, budget.quota) == (len(allowed), len(cores), quota)
    assert default_threads() == budget.threads == expected
    with Engine(demo_path, n_ctx=64, hidden_states=False) as engine:
        assert engine.n_threads == expected and engine.info().n_threads == expected
    # pinned to one CPU (as `taskset -c N` does), the engine uses one thread, not os.cpu_count()
    code = ("from ggml_probe.engine.model import Engine; import sys; "
            "print(Engine(sys.argv[1], n_ctx=64, hidden_states=False).n_threads)")
    pinned = subprocess.run([sys.executable, "-c", code, str(demo_path)], capture_output=True, text=True, check=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {min(allowed)}))
    assert pinned.stdout.split()[-1] == "1"


def test_thread_budget_reads_quotas_and_hyperthreads(tmp_path):
    """The parsing on files written here: two hyperthreads of one core, a quota of 1.5 CPUs, no quota."""
    cpus = sorted(os.sched_getaffinity(0))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("".join(f"processor\t: {c}\nphysical id\t: 0\ncore id\t\t: {c // 2}\n\n" for c in cpus))
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("150000 100000\n")
    b = cpu_budget(cpuinfo=cpuinfo, cgroup_root=root, self_cgroup="0::/\n")
    assert b.allowed == len(cpus) and b.physical == len({c // 2 for c in cpus}) and b.quota == 1 and b.threads == 1
    (root / "cpu.max").write_text("max 100000\n")
    assert cpu_budget(cpuinfo=cpuinfo, cgroup_root=root, self_cgroup="0::/\n").quota is None
    # a nested cgroup: the tighter of its own and its parent's quota
    (root / "job").mkdir()
    (root / "job" / "cpu.max").write_text("300000 100000\n")
    (root / "cpu.max").write_text("200000 100000\n")
    assert cpu_budget(cpuinfo=cpuinfo, cgroup_root=root, self_cgroup="0::/job\n").quota == 2
    # cgroup v1, and a cpuinfo that does not name cores (e.g. ARM): no cap from it
    (root / "cpu.max").unlink()
    v1 = root / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    cpuinfo.write_text("".join(f"processor\t: {c}\nBogoMIPS\t: 50.00\n\n" for c in cpus))
    b = cpu_budget(cpuinfo=cpuinfo, cgroup_root=root, self_cgroup="1:cpu,cpuacct:/\n0::/\n")
    assert b.quota == 4 and b.physical == os.cpu_count()
