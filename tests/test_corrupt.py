"""validate_gguf against hundreds of corrupted copies of a real (tiny) llama GGUF.

The slow test feeds every corruption to a subprocess worker that validates it and, when it
passes, loads it in llama.cpp and decodes one batch: a llama.cpp abort kills only the worker.
Rejected files are also given, unguarded, to a second worker, to learn whether the validator
prevented a crash, anticipated llama.cpp's own refusal, or was stricter than llama.cpp.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

import validate_tiny_gguf as tiny
from ggml_probe.errors import BadModelFile, ProbeError
from ggml_probe.models.store import demo_model_path
from ggml_probe.formats.gguf import read_gguf, validate_gguf

WORKER = Path(__file__).with_name("validate_worker.py")
SEED = 20250817


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """The tiny llama with a self-made 269-token vocabulary: quick to build and to map."""
    path = tmp_path_factory.mktemp("small") / "tiny-selfmade.gguf"
    return tiny.write_tiny_llama(path, tiny.self_made_vocab(), seed=1)


@pytest.fixture()
def corrupt(tmp_path):
    """corrupt(name, bytes) -> path of a file holding those bytes."""
    def write(name: str, data: bytes) -> Path:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        return path
    return write


def _message(path: Path) -> str:
    with pytest.raises(BadModelFile) as caught:
        validate_gguf(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    return text[len(f"{path}: "):]


# ---------------------------------------------------------------------------------------------
# quick tests: the summary, and named corruptions with their exact messages


def test_summary_matches_gguf_py(small_model):
    from gguf import GGUFReader

    summary = validate_gguf(small_model)
    reader = GGUFReader(small_model)
    assert summary.version == 3 and summary.architecture == "llama"
    assert [t.name for t in summary.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(summary.tensors, reader.tensors):
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.ggml_type == int(theirs.tensor_type)
        assert mine.offset == theirs.data_offset
        assert mine.n_bytes == theirs.n_bytes
    assert summary.value("llama.block_count") == tiny.N_LAYER
    assert summary.value("tokenizer.ggml.tokens") == tiny.self_made_vocab().tokens
    assert summary.value("tokenizer.ggml.merges")[:2] == ["Ġ t", "h e"]
    assert summary.tensor("blk.0.ffn_up.weight").type_name == "Q8_0"
    # the data section starts where gguf-py finds it and ends at the file's end (alignment padding only)
    assert summary.data_offset == reader.data_offset
    end = max(t.offset + t.n_bytes for t in summary.tensors)
    assert 0 <= summary.file_size - end < summary.alignment == 32


def test_read_gguf_returns_a_reader_only_for_valid_files(small_model, corrupt):
    reader = read_gguf(small_model)
    assert len(reader.tensors) == 2 * 9 + 2
    bad = corrupt("bad", b"GGUF" + small_model.read_bytes()[4:100])
    with pytest.raises(BadModelFile, match="truncated"):
        read_gguf(bad)


def test_named_corruptions_give_exact_messages(small_model, corrupt, tmp_path):
    data = small_model.read_bytes()
    layout = tiny.read_layout(small_model)
    n_vocab = len(tiny.self_made_vocab().tokens)
    size = len(data)

    assert _message(corrupt("magic", tiny.patch(data, 0, b"\0\0\0\0"))) == \
        "not a GGUF file (starts with b'\\x00\\x00\\x00\\x00')"
    assert _message(corrupt("gguf-lower", tiny.patch(data, 0, b"gguf"))) == "not a GGUF file (starts with b'gguf')"
    assert _message(corrupt("empty", b"")) == "not a GGUF file (only 0 bytes)"
    assert _message(corrupt("header-only", data[:20])) == \
        "truncated: 20 bytes, shorter than the 24-byte GGUF header"
    half = size // 2
    assert _message(corrupt("half", data[:half])) == (
        f"truncated: tensor data ends at byte {size} but the file has {half} bytes "
        "(last tensor 'output_norm.weight'; an incomplete download?)")
    assert _message(corrupt("v1", tiny.patch(data, 4, tiny.u32(1)))) == \
        "unsupported GGUF version 1 (llama.cpp reads versions 2 and 3)"
    assert _message(corrupt("swapped", tiny.patch(data, 4, tiny.u32(0x03000000)))) == \
        "GGUF version 0x03000000: a big-endian file, which this machine cannot load"
    assert _message(corrupt("counts", tiny.patch(data, 16, tiny.u64(2**40)))) == (
        f"truncated or corrupt: the header claims {2**40} key-values and {len(layout.tensors)} tensors, "
        f"more than a {size}-byte file can hold")

    block_count = layout.kv("llama.block_count")
    assert _message(corrupt("blocks0", tiny.patch(data, block_count.value_pos, tiny.u32(0)))) == \
        "llama.block_count is 0 (llama.cpp supports 1 to 512)"
    assert _message(corrupt("tag99", tiny.patch(data, block_count.type_pos, tiny.u32(99)))) == \
        "key 'llama.block_count' has invalid value type 99"
    as_string = tiny.splice(data, layout, [(block_count.start, block_count.end,
                                            tiny.encode_kv("llama.block_count", 8, "2"))])
    assert _message(corrupt("blocks-str", as_string)) == "key 'llama.block_count' has type STRING, expected UINT32"
    embd = layout.kv("llama.embedding_length")
    assert _message(corrupt("no-embd", tiny.splice(data, layout, [(embd.start, embd.end, b"")], kv_delta=-1))) == \
        "missing required key 'llama.embedding_length'"

    tokens = layout.kv("tokenizer.ggml.tokens")
    count_pos = tokens.value_pos + 4
    assert _message(corrupt("huge-array", tiny.patch(data, count_pos, tiny.u64(2**60)))) == (
        f"truncated or corrupt: key 'tokenizer.ggml.tokens' claims {2**60} STRING elements "
        f"but only {size - count_pos - 8} bytes are left in the file")
    vocab = tiny.self_made_vocab().tokens
    duplicated = list(vocab)
    duplicated[258] = duplicated[257]
    dup_file = tiny.splice(data, layout, [(tokens.start, tokens.end, tiny.encode_kv(tokens.key, 9, duplicated, 8))])
    assert _message(corrupt("dup-token", dup_file)) == \
        f"tokenizer.ggml.tokens has duplicate token {vocab[257]!r} (ids 257 and 258)"
    bos = layout.kv("tokenizer.ggml.bos_token_id")
    assert _message(corrupt("bos", tiny.patch(data, bos.value_pos, tiny.u32(n_vocab)))) == \
        f"tokenizer.ggml.bos_token_id is {n_vocab}, outside the vocabulary of {n_vocab} tokens"
    rope = tiny.encode_kv("llama.rope.scaling.type", 8, "bogus")
    end = layout.kvs[-1].end
    assert _message(corrupt("rope", tiny.splice(data, layout, [(end, end, rope)], kv_delta=1))) == \
        "llama.rope.scaling.type is 'bogus' (llama.cpp knows linear, longrope, none, yarn)"

    embd_info = layout.tensor("token_embd.weight")
    assert _message(corrupt("ndims", tiny.patch(data, embd_info.n_dims_pos, tiny.u32(5)))) == \
        "tensor 'token_embd.weight' has 5 dimensions (must be 1 to 4)"
    up = layout.tensor("blk.0.ffn_up.weight")
    assert _message(corrupt("block", tiny.patch(data, up.dims_pos, tiny.u64(48)))) == \
        "tensor 'blk.0.ffn_up.weight': rows of 48 elements are not a multiple of the Q8_0 block size 32"
    q = layout.tensor("blk.0.attn_q.weight")
    renamed = tiny.splice(data, layout, [(q.start, q.start + 8 + len(q.name), tiny.gguf_string("blk.0.attn_k.weight"))])
    assert _message(corrupt("dup-name", renamed)) == "duplicate tensor name 'blk.0.attn_k.weight'"
    renamed = tiny.splice(data, layout, [(q.start, q.start + 8 + len(q.name), tiny.gguf_string("blk.7.attn_q.weight"))])
    assert _message(corrupt("layer", renamed)) == \
        "tensor 'blk.7.attn_q.weight' belongs to layer 7 but llama.block_count is 2"
    offset = struct.unpack_from("<Q", data, q.offset_pos)[0]
    assert _message(corrupt("offset", tiny.patch(data, q.offset_pos, tiny.u64(offset + 32)))) == (
        f"tensor 'blk.0.attn_q.weight': data offset {offset + 32}, expected {offset} "
        "(tensor data must be contiguous and in header order)")

    assert _message(tmp_path / "missing.gguf") == "no such file"
    assert _message(tmp_path) == "is a directory, not a GGUF file"
    # the container checks alone accept a file whose llama metadata is broken
    assert validate_gguf(corrupt("blocks0-container", tiny.patch(data, block_count.value_pos, tiny.u32(0))),
                         for_llama=False).tensors


# ---------------------------------------------------------------------------------------------
# the fuzz: every corruption through a subprocess worker and llama.cpp


class Worker:
    """A persistent validate-and-load subprocess that is restarted when a file kills it."""

    def __init__(self, unguarded: bool, log_path: Path):
        self.command = [sys.executable, str(WORKER)] + (["--unguarded"] if unguarded else [])
        self.log_path = log_path
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self.process.stdout, self.lines), daemon=True).start()
        ready = self.lines.get(timeout=120)
        assert ready is not None and json.loads(ready)["stage"] == "ready", self.log_path.read_text()

    @staticmethod
    def _pump(stream, lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)  # end of file: the worker died

    def ask(self, path: Path, timeout: float = 60) -> dict:
        """The worker's final reply, or {"crashed": ...} with what it said before it died."""
        self.process.stdin.write(json.dumps({"path": str(path)}) + "\n")
        self.process.stdin.flush()
        stages = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.process.kill()
                line = None
                stages.append("hung")
            if line is None:
                return self._died(stages)
            answer = json.loads(line)
            if answer["stage"] == "done":
                return answer
            stages.append(answer["stage"])

    def _died(self, stages: list[str]) -> dict:
        self.process.wait()
        self.log.close()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()
        reason = next((line for line in reversed(tail) if "GGML_ASSERT" in line or "error" in line.lower()),
                      tail[-1] if tail else "")
        reason = re.sub(r"\S*/(?=[\w.-]+:\d+:)", "", reason)  # drop the build directory from file:line
        if not reason and self.process.returncode == -11:
            reason = "segmentation fault"
        result = {"crashed": True, "returncode": self.process.returncode, "stages": stages, "reason": reason}
        self.restarts += 1
        self._start()
        return result

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory) -> Path:
    vocab = tiny.demo_vocab() or tiny.self_made_vocab()
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("fuzz") / f"tiny-{vocab.source}.gguf", vocab, seed=2)


@pytest.mark.slow
def test_no_corruption_crashes_or_slips_through(fuzz_model, tmp_path):
    pytest.importorskip("llama_cpp")
    data = fuzz_model.read_bytes()
    cases = tiny.corruptions(data, tiny.read_layout(fuzz_model), SEED)
    assert len(cases) >= 200
    kept = tmp_path / "kept"
    kept.mkdir()
    guarded = Worker(unguarded=False, log_path=tmp_path / "guarded.log")
    unguarded = Worker(unguarded=True, log_path=tmp_path / "unguarded.log")
    try:
        # Valid files of every flavour, and the real demo model, must pass and run.
        valid = [fuzz_model] + [tiny.write_tiny_model(tmp_path / f"tiny-{arch}.gguf", tiny.self_made_vocab(), arch)
                                for arch in tiny.TINY_ARCHS if arch != "llama"]
        try:
            valid.append(demo_model_path())
        except ProbeError:
            pass
        for path in valid:
            answer = guarded.ask(path)
            assert answer.get("verdict") == "passed" and answer["decoded"] and answer["finite"], (path, answer)
        tally, crashes, slipped, guarded_crashes, stricter, harmless = _run_cases(
            cases, guarded, unguarded, tmp_path, kept)
    finally:
        guarded.close()
        unguarded.close()

    print(f"\n{len(cases)} corruptions (model: {fuzz_model.name}, {len(data)} bytes, seed {SEED})")
    for outcome in ("rejected by validator", "  ... which llama.cpp also refuses",
                    "  ... which crash llama.cpp unguarded", "  ... which llama.cpp loads",
                    "loaded fine", "  ... with non-finite logits (corrupted weights)",
                    "passed but llama.cpp failed", "crashed"):
        print(f"  {outcome}: {tally[outcome]}")
    for label, message, reason in guarded_crashes:
        print(f"  GUARDED CRASH {label}: validator says {message!r}; unguarded llama.cpp: {reason}")
    for label, message in stricter:
        print(f"  stricter than llama.cpp {label}: {message}")
    print(f"  loaded fine: {'; '.join(harmless)}")
    for label, answer in crashes:
        print(f"  CRASH {label}: {answer} (file kept in {kept})")
    for label, error in slipped:
        print(f"  SLIPPED {label}: {error}")

    assert not crashes, f"{len(crashes)} corrupted files crashed the guarded worker: {crashes[:5]}"
    assert not slipped, f"{len(slipped)} corrupted files passed validation but llama.cpp failed: {slipped[:5]}"
    # The harness must see a llama.cpp crash as a dead worker: the unguarded worker, given the
    # files the validator refused, shows that some of them abort llama.cpp 0.3.36 (block_count 0,
    # duplicate tokens, F16 norm weights, ...).
    assert guarded_crashes, "no rejected file crashed unguarded llama.cpp: is crash detection working?"
    assert tally["rejected by validator"] >= len(cases) * 3 // 4
    assert tally["loaded fine"] > 0  # harmless corruptions (weights, chat template text) must still pass


def _run_cases(cases, guarded: Worker, unguarded: Worker, tmp_path: Path, kept: Path):
    """Every corruption through the guarded worker; what it refuses also through the unguarded one."""
    tally: Counter = Counter()
    crashes, slipped, guarded_crashes, stricter, harmless = [], [], [], [], []
    for index, case in enumerate(cases):
        path = tmp_path / f"case-{index}.gguf"
        path.write_bytes(case.make())
        answer = guarded.ask(path)
        label = f"[{case.category}] {case.name}"
        if answer.get("crashed"):
            tally["crashed"] += 1
            crashes.append((label, answer))
            shutil.copy(path, kept / path.name)  # the file that killed the worker, for a post-mortem
        elif answer["verdict"] == "rejected":
            tally["rejected by validator"] += 1
            assert "\n" not in answer["message"] and answer["message"].startswith(f"{path}: "), answer
            probe = unguarded.ask(path)
            if probe.get("crashed"):
                tally["  ... which crash llama.cpp unguarded"] += 1
                guarded_crashes.append((label, answer["message"].removeprefix(f"{path}: "), probe["reason"]))
            elif not probe["loaded"]:
                tally["  ... which llama.cpp also refuses"] += 1
            else:
                tally["  ... which llama.cpp loads"] += 1
                stricter.append((label, answer["message"].removeprefix(f"{path}: ")))
        elif answer.get("decoded"):
            tally["loaded fine"] += 1
            tally["  ... with non-finite logits (corrupted weights)"] += not answer["finite"]
            harmless.append(label)
        else:
            tally["passed but llama.cpp failed"] += 1
            slipped.append((label, answer.get("error")))
        path.unlink()
    return tally, crashes, slipped, guarded_crashes, stricter, harmless
