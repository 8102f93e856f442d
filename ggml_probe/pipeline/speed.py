"""`ggml-probe bench`: prompt-processing and generation speed per level, as llama-bench measures them,
and the memory each level needs.

llama-bench's protocol (tools/llama-bench/llama-bench.cpp):
- ppN: N random tokens (BOS first when the vocabulary adds one, then uniform over the vocabulary) decoded
  from an empty cache in pieces of n_batch tokens, the last token an output; tgN: N tokens decoded one at
  a time with the KV cache kept, every one an output (BOS first, then random tokens).
- Before the repetitions, one warm-up run: a whole prompt for pp, one generated token for tg.
- Each repetition clears the cache, is timed with a wall clock around the decodes (each synchronised),
  and gives a rate of tokens / seconds; the figures are the mean of the rates and their sample standard
  deviation (n − 1).
- The decodes run on a persistent CPU threadpool of the given threads, polling at level 50.
- Defaults: n_batch 2048, n_ubatch 512, the context n_prompt + n_gen of the test, F16 KV cache, flash
  attention auto (on for CPU). Here flash attention is off by default, as everywhere in ggml-probe; set
  it the same on both sides to compare (scripts/bench_speed.py passes llama-bench `-fa`).

Each test runs in its own context of n_prompt + n_gen cells, as llama-bench's do. The pp decode is cut
into pieces of min(n_batch, n_ubatch) tokens, each one llama_decode, where llama-bench hands llama.cpp n_batch tokens that it splits into the
same ubatches. The tokens counted are llama.cpp's own (its context's eval counters), not this loop's.
"""

from __future__ import annotations

import os
import re
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..engine.ggml_lib import device_memory
from ..engine.llama_lib import default_threads, versions
from ..engine.model import Engine
from ..errors import ProbeError
from ..models.ggufinfo import inspect_gguf
from ..models.store import resolve_model
from .evaluation import ladder_files
from .runs import implied_requantize

# Called as progress(label, done_steps, total_steps) after every warm-up run and repetition.
BenchProgress = Callable[[str, int, int], None]


@dataclass
class BenchSettings:
    n_prompt: int | tuple[int, ...] = 512  # llama-bench -p: one size, or several (-p 128,512), a pp test each
    n_gen: int | tuple[int, ...] = 128  # llama-bench -n: likewise, a tg test each
    reps: int = 5  # llama-bench -r
    threads: int | None = None  # None: the cores this process may use
    gpu_layers: str | int = "auto"
    batch: int = 2048  # llama-bench -b
    ubatch: int = 512  # llama-bench -ub
    flash_attn: bool = False  # llama-bench's default is auto (on for CPU): pass -fa to compare
    warmup: bool = True  # llama-bench --no-warmup turns it off
    seed: int = 0  # of the random tokens (llama-bench: std::rand, unseeded)

    def __post_init__(self) -> None:
        sizes = _sizes(self.n_prompt) + _sizes(self.n_gen)
        if any(n < 0 for n in sizes) or not any(sizes):
            raise ProbeError("bench needs -p or -n above 0 (and neither below 0)")
        if self.reps < 1:
            raise ProbeError("bench needs -r 1 or more repetitions")
        if self.batch < 1 or self.ubatch < 1:
            raise ProbeError("--batch and --ubatch must be at least 1")

    def tests(self) -> list["SpeedTest"]:
        """The tests asked, as llama-bench runs them: every pp size, then every tg size (0 skipped, a size
        given twice run once)."""
        pp = [SpeedTest(f"pp{n}", n, 0) for n in dict.fromkeys(_sizes(self.n_prompt)) if n]
        return pp + [SpeedTest(f"tg{n}", 0, n) for n in dict.fromkeys(_sizes(self.n_gen)) if n]


def _sizes(value: int | Sequence[int]) -> tuple[int, ...]:
    return (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)


@dataclass
class SpeedTest:
    """One llama-bench test (ppN or tgN) of one level: a sample per repetition."""

    name: str
    n_prompt: int
    n_gen: int
    samples_ns: list[int] = field(default_factory=list)  # wall time of each repetition
    tokens_counted: list[int] = field(default_factory=list)  # what llama.cpp counted as evaluated, per repetition

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen

    @property
    def rates(self) -> np.ndarray:
        """Tokens per second of each repetition (llama-bench's get_ts)."""
        return 1e9 * self.n_tokens / np.asarray(self.samples_ns, dtype=np.float64)

    @property
    def mean(self) -> float:
        return float(np.mean(self.rates))

    @property
    def sd(self) -> float:
        """Sample standard deviation of the rates (llama-bench's stdev: n − 1; 0 for one repetition)."""
        return float(np.std(self.rates, ddof=1)) if len(self.samples_ns) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"n_prompt": self.n_prompt, "n_gen": self.n_gen, "reps": len(self.samples_ns),
                "samples_ns": list(self.samples_ns), "rates": self.rates.tolist(),
                "tokens_per_second": self.mean, "tokens_per_second_sd": self.sd,
                "tokens_counted": list(self.tokens_counted)}


@dataclass
class LevelBench:
    """Speed and memory of one GGUF file."""

    path: Path
    file_bytes: int
    bits_per_weight: float  # of the file's tensor data, per parameter (ggml-probe inspect)
    model_bytes: int  # llama.cpp's llama_model_size (llama-bench's "size")
    n_params: int
    tests: dict[str, SpeedTest] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)

    def speed(self) -> dict[str, float | None]:
        """Mean tokens/s of the pp and tg tests (None where not run), the figures `pick` weighs."""
        pp = next((t for t in self.tests.values() if t.n_prompt), None)
        tg = next((t for t in self.tests.values() if t.n_gen), None)
        return {"pp_tokens_per_s": pp.mean if pp else None, "pp_tokens_per_s_sd": pp.sd if pp else None,
                "tg_tokens_per_s": tg.mean if tg else None, "tg_tokens_per_s_sd": tg.sd if tg else None}

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "file_bytes": self.file_bytes, "bits_per_weight": self.bits_per_weight,
                "model_bytes": self.model_bytes, "n_params": self.n_params, **self.speed(),
                "tests": {k: t.to_dict() for k, t in self.tests.items()}, "memory": self.memory,
                "engine": self.engine}


@dataclass
class BenchResult:
    settings: BenchSettings
    levels: dict[str, LevelBench] = field(default_factory=dict)
    system: dict[str, Any] = field(default_factory=dict)

    def speed(self) -> dict[str, dict[str, float | None]]:
        """Per level: pp/tg tokens/s and their sd (pick_levels' speed=)."""
        return {name: level.speed() for name, level in self.levels.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "system": self.system,
                "levels": {k: v.to_dict() for k, v in self.levels.items()}}


# ----------------------------------------------------------------------------- process memory

def _status_kib(field_name: str) -> int | None:
    try:
        m = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) where Linux allows it (/proc/self/clear_refs, 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(peak if os.uname().sysname == "Darwin" else peak * 1024)


def _gpu_free() -> dict[str, int]:
    return {d["name"]: d["free"] for d in device_memory() if d["type"] in ("GPU", "IGPU")}


# ----------------------------------------------------------------------------- the tests

def random_tokens(rng: np.random.Generator, n: int, n_vocab: int, bos: int | None) -> np.ndarray:
    """llama-bench's input: BOS first when the vocabulary adds one, the rest uniform over the vocabulary."""
    toks = rng.integers(0, n_vocab, size=n, dtype=np.int32)
    if bos is not None and n:
        toks[0] = bos
    return toks


def prompt_pass(engine: Engine, tokens: np.ndarray) -> None:
    """llama-bench's test_prompt: the tokens from position 0, in pieces of one batch, the last one an output."""
    step = engine.n_batch
    for start in range(0, len(tokens), step):
        piece = tokens[start:start + step]
        engine.decode_at(piece, start, outputs="last" if start + step >= len(tokens) else "none", read=False)


def generation_pass(engine: Engine, tokens: np.ndarray) -> None:
    """llama-bench's test_gen: one token at a time after what the cache holds, each an output."""
    for tok in tokens:
        engine.decode_at(tok.reshape(1), None, outputs="last", read=False)


def _counted(engine: Engine, test: SpeedTest, step: int) -> int:
    """The tokens llama.cpp counted in this repetition, from its eval counters: it counts a decode of one
    token as generated, of more as prompt, and reports a count of 0 as 1, so only the counters the test's
    decodes feed are read (a pp whose last piece is a single token feeds both)."""
    n_p, n_g = engine.eval_counts()
    if test.n_gen:
        return n_g
    pieces = [min(step, test.n_prompt - start) for start in range(0, test.n_prompt, step)]
    return (n_p if any(k > 1 for k in pieces) else 0) + (n_g if any(k == 1 for k in pieces) else 0)


def run_test(engine: Engine, test: SpeedTest, s: BenchSettings, rng: np.random.Generator,
             progress: Callable[[], None] | None = None) -> SpeedTest:
    """The warm-up and the repetitions of one test, recorded into `test`."""
    bos = engine.bos if engine.add_bos else None
    run = prompt_pass if test.n_prompt else generation_pass
    n = test.n_prompt or test.n_gen
    engine.clear_cache()
    if s.warmup:  # llama-bench: a whole prompt, or one generated token
        run(engine, random_tokens(rng, n if test.n_prompt else 1, engine.n_vocab, bos))
        if progress:
            progress()
    for _ in range(s.reps):
        tokens = random_tokens(rng, n, engine.n_vocab, bos)
        engine.clear_cache()
        engine.reset_eval_counts()
        t0 = time.perf_counter_ns()
        run(engine, tokens)
        test.samples_ns.append(time.perf_counter_ns() - t0)
        test.tokens_counted.append(_counted(engine, test, engine.n_batch))
        if progress:
            progress()
    return test


def _context_memory(model_bytes: int, buffers: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {"buffers": buffers,
            "kv_bytes": sum(buffers.get("KV", {}).values()),
            "compute_bytes": sum(buffers.get("compute", {}).values()),
            "output_bytes": sum(buffers.get("output", {}).values()),
            # what llama.cpp needs: weights + KV cache + output + compute buffers
            "llama_bytes": model_bytes + sum(sum(v.values()) for v in buffers.values())}


def bench_file(path: Path, s: BenchSettings, label: str = "", progress: BenchProgress | None = None) -> LevelBench:
    """Both tests of one GGUF file, and what it needed in memory.

    Each test gets its own context of n_prompt + n_gen cells, as in llama-bench (a tg test in the pp
    test's larger cache measured 5–19 % slower on the demo's Q8_0, 1 thread).
    The level's memory is its largest test's; peak RSS covers both.
    """
    path = Path(path)
    info = inspect_gguf(path)
    rng = np.random.default_rng(s.seed)
    gpu_before = _gpu_free()
    rss_before = _rss_bytes()
    peak_scope = "level" if _reset_peak_rss() else "process"
    tests = s.tests()
    total = len(tests) * (s.reps + int(s.warmup))
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(label or path.name, done, total)

    level: LevelBench | None = None
    rss, gpu_after, largest = None, gpu_before, None
    for t in tests:
        with Engine(path, n_ctx=t.n_tokens, n_batch=min(s.batch, s.ubatch), n_threads=s.threads,
                    gpu_layers=s.gpu_layers, hidden_states=False, flash_attn=s.flash_attn) as engine:
            buffers = engine.context_buffers()  # read from the creation log: before any decode
            if level is None:
                model_bytes, n_params = engine.model_size()
                level = LevelBench(path, path.stat().st_size, info.bits_per_weight, model_bytes, n_params)
                level.engine = {"n_batch": engine.n_batch, "threads": engine.n_threads,
                                "gpu_layers": engine.gpu_layers_requested, "offloaded": engine.offloaded_layers,
                                "flash_attn": s.flash_attn, "n_ctx": {}}
            level.engine["n_ctx"][t.name] = engine.n_ctx
            memory = _context_memory(level.model_bytes, buffers)
            if largest is None or memory["llama_bytes"] > largest["llama_bytes"]:
                largest = memory
            with engine.threadpool(poll=50) as pooled:  # llama-bench's own threadpool: persistent, poll 50
                level.engine["threadpool"] = pooled
                level.tests[t.name] = run_test(engine, t, s, rng, step)
            rss = _rss_bytes()
            gpu_now = _gpu_free()
            gpu_after = {k: min(v, gpu_after.get(k, v)) for k, v in gpu_now.items()}
    assert level is not None and largest is not None  # BenchSettings asks for at least one test
    level.memory = {
        **largest,
        "rss_bytes": rss,  # the whole process's resident memory with the last test's context loaded and run
        "rss_added_bytes": None if rss is None or rss_before is None else rss - rss_before,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_scope": peak_scope,  # "level": reset before loading it; "process": since the start
        "vram_used_bytes": {k: gpu_before[k] - gpu_after.get(k, gpu_before[k]) for k in gpu_before} or None,
    }
    return level


def bench_files(files: dict[str, Path], settings: BenchSettings | None = None,
                progress: BenchProgress | None = None) -> BenchResult:
    """Every file, one after another in this process, keyed as given."""
    s = settings or BenchSettings()
    threads = s.threads or default_threads()
    s = BenchSettings(**{**asdict(s), "threads": threads})
    v = versions()
    result = BenchResult(s, system={"llama_cpp_python": v["llama_cpp_python"],
                                    "system_info": v["llama_cpp_system_info"],
                                    "gpu_offload_supported": v["gpu_offload_supported"],
                                    "cpu_count": os.cpu_count()})
    for name, path in files.items():
        result.levels[name] = bench_file(path, s, name, progress)
    return result


def bench_models(models: Sequence[str | Path], levels: Sequence[str] | None = None,
                 settings: BenchSettings | None = None, *, allow_requantize: bool = False,
                 progress: BenchProgress | None = None) -> BenchResult:
    """`ggml-probe bench`: each model, or with `levels` each model's ladder (missing files built first,
    as `eval --quants` does). Keys: the level (one model with levels), the file's stem (models), or
    'stem LEVEL' (several models with levels)."""
    files: dict[str, Path] = {}
    for model in models:
        src = resolve_model(model)
        if levels:
            allow = allow_requantize or implied_requantize(model, levels, allow_requantize)
            for level, path in ladder_files(src, levels, allow_requantize=allow).items():
                files[level if len(models) == 1 else f"{src.stem} {level}"] = path
        else:
            files[src.stem if src.stem not in files else str(src)] = src
    return bench_files(files, settings, progress)
