"""Which level of a ladder should I run? `ggml-probe pick`: the ladder, its text KLD, the pick.

    from ggml_probe.analysis.pick import Budget
    from ggml_probe.pipeline.pick import pick_levels

    res = pick_levels("demo", ["F16", "Q8_0", "Q4_K_M", "Q4_0"], text=open("wiki.test.raw").read(),
                      budget=Budget(max_kld=0.1, memory_bytes=8 << 30))
    res.pick.pick, res.pick.reasons, res.to_dict()

Every level is scored against the highest-precision one (by bits per weight) with llama-perplexity's
KLD protocol (pipeline.kld.run_kld: mean and p99 KLD, same top p) on a text: a file, or a task's own
text (BoolQ: its passages). Size and bits per weight come from the GGUF header; the memory a level needs
is its file plus the KV cache and compute buffers at `run_ctx` (analysis.pick.context_allowance). Task
accuracy deltas (with their paired intervals) come from the eval runs when an EvalConfig is given, or
from `accuracy`; speed (pp/tg tokens/s) from `measure_speed` (e.g. pipeline.speed's bench, as `pick --speed`
does) or given in `speed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..analysis.pick import Budget, PickResult, context_allowance, pick, records_from_dicts, validate_budget
from ..errors import ProbeError
from ..models.ggufinfo import GGUFInfo, inspect_gguf
from ..models.quant_types import normalize_quant
from ..models.quantize import ladder_stem
from ..models.store import resolve_model
from ..tasks import get_task, load_examples
from .evaluation import EvalConfig, ladder_files
from .kld import ChunkProgress, KLDSettings, run_kld
from .rundir import write_json
from .runs import implied_requantize, run_levels

# The text a task gives the KLD: (the task definition holding it, its fields). BoolQ's question-only
# prompt has no passage, so its text comes from boolq-passage's passage field (the same data file).
TASK_TEXT_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolq": ("boolq-passage", ("passage",)),
    "boolq-passage": ("boolq-passage", ("passage",)),
}
DEFAULT_RUN_CTX = 4096  # llama.cpp's default context (llama-cli, llama-server)
DEFAULT_CHUNKS = 32  # 32 chunks of 512 tokens: 8,160 scored tokens per level

# Measures the speed of the ladder's files, by level: {level: {"pp_tokens_per_s", "tg_tokens_per_s", ...}}.
SpeedMeasure = Callable[[dict[str, Path]], Mapping[str, Mapping[str, Any]]]


def task_text(task: str, data_path: str | Path | None = None, *, limit: int | None = None,
              max_chars: int | None = None) -> tuple[str, dict[str, Any]]:
    """A task's own text for the KLD (BoolQ: its passages; other tasks: their prompt fields), each
    distinct text once in file order, joined by blank lines; and what it is."""
    spec_name, fields = TASK_TEXT_FIELDS.get(task, (task, None))
    data = load_examples(get_task(spec_name), data_path=data_path, limit=limit)
    seen: set[str] = set()
    parts: list[str] = []
    size = 0
    for ex in data.examples:
        for name in fields or tuple(ex.fields):
            value = str(ex.fields.get(name, "")).strip()
            if value and value not in seen:
                seen.add(value)
                parts.append(value)
                size += len(value) + 2
        if max_chars is not None and size >= max_chars:
            break
    if not parts:
        raise ProbeError(f"task {task} has no text in {data.source}")
    described = {"source": "task", "task": task, "fields": list(fields or data.examples[0].fields),
                 "data": data.source, "texts": len(parts)}
    return "\n\n".join(parts), described


def level_context(info: GGUFInfo, n_ctx: int) -> dict[str, int] | None:
    """The KV cache and compute buffers a level needs at n_ctx tokens (None: the header lacks a figure)."""
    arch = info.architecture
    md = info.metadata
    need = (info.n_layers, info.n_kv_heads, info.n_heads, info.hidden_size, info.ffn_size, info.vocab_size)
    if arch is None or any(v is None for v in need):
        return None
    head_k = md.get(f"{arch}.attention.key_length") or info.hidden_size // info.n_heads
    head_v = md.get(f"{arch}.attention.value_length") or head_k
    return context_allowance(n_layers=info.n_layers, n_kv_heads=info.n_kv_heads, head_dim_k=int(head_k),
                             head_dim_v=int(head_v), n_heads=info.n_heads, hidden_size=info.hidden_size,
                             ffn_size=info.ffn_size, n_vocab=info.vocab_size, n_ctx=n_ctx)


def accuracy_from_comparison(comparison: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per level, the accuracy change against the comparison's reference in points, with its paired 95%
    interval (pipeline.compare: label-set scoring); the reference itself: 0."""
    out: dict[str, dict[str, Any]] = {comparison["reference"]: {"accuracy_delta": 0.0, "accuracy_delta_ci": None}}
    for level, c in comparison["levels"].items():
        d = c["accuracy_delta"]
        ci = (100 * d["ci_low"], 100 * d["ci_high"]) if d.get("ci_low") is not None else None
        out[level] = {"accuracy_delta": 100 * d["value"], "accuracy_delta_ci": ci}
    return out


@dataclass
class LadderPick:
    model: str
    reference: str
    files: dict[str, Path]
    levels: dict[str, dict[str, Any]]  # every figure of every level, the pick's record among them
    text: dict[str, Any]  # what the KLD was measured on
    kld: dict[str, Any]  # run_kld's result (the reference is not scored against itself)
    pick: PickResult
    requantized_from: str | None = None
    notes: list[str] = field(default_factory=list)
    run_ctx: int = DEFAULT_RUN_CTX
    accuracy_source: str | None = None
    speed_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "reference": self.reference, "requantized_from": self.requantized_from,
                "notes": self.notes, "run_ctx": self.run_ctx, "text": self.text,
                "accuracy_source": self.accuracy_source, "speed_source": self.speed_source,
                "levels": self.levels, "pick": self.pick.to_dict(), "kld": self.kld}


def _highest_precision(infos: Mapping[str, GGUFInfo]) -> str:
    return max(infos, key=lambda level: infos[level].bits_per_weight)  # ties: the first in ladder order


def pick_levels(model: str | Path, quants: Sequence[str], *, text: str | None = None, text_file: str | Path | None = None,
                task: str | None = None, data_path: str | Path | None = None, task_limit: int | None = None,
                budget: Budget | None = None, prefer: str = "size", out: str | Path | None = None,
                kld_settings: KLDSettings | None = None, run_ctx: int = DEFAULT_RUN_CTX,
                allow_requantize: bool = False, eval_config: EvalConfig | None = None,
                accuracy: Mapping[str, Mapping[str, Any]] | None = None,
                speed: Mapping[str, Mapping[str, Any]] | None = None, speed_source: str | None = None,
                measure_speed: SpeedMeasure | None = None, progress: ChunkProgress | None = None,
                eval_progress=None) -> LadderPick:
    """Build (or reuse) the ladder, measure every level's text KLD against the highest-precision level,
    and pick the level to run (analysis.pick.pick).

    The text: `text` (`text_file` names it), else the task's own text (`task`, `data_path`; BoolQ: its
    passages). eval_config: also run the task at every level (resumable, OUT/eval-TASK) and take the
    accuracy deltas from the comparison. measure_speed: called with the ladder's files, returns each level's
    speed (speed_source says how it was measured). accuracy / speed: per-level figures given by the caller
    instead ({"accuracy_delta": points, "accuracy_delta_ci": (lo, hi)}; {"pp_tokens_per_s", "tg_tokens_per_s"}).
    out: default runs/pick/<model stem>; the KLD base and scores are cached there (OUT/kld).
    """
    levels = list(dict.fromkeys(normalize_quant(q) for q in quants))
    if len(levels) < 2:
        raise ProbeError("pick needs two levels or more (--quants F16,Q8_0,Q4_K_M,...): one of them is the reference")
    budget = validate_budget(budget or Budget())
    if prefer not in ("size", "speed"):
        raise ProbeError(f"--prefer must be size or speed, not {prefer!r}")
    if prefer == "speed" and not speed and measure_speed is None:
        raise ProbeError("--prefer speed needs each level's speed (tokens/s): pass --speed to measure it")
    if text is None and task is None:
        raise ProbeError("pick needs a text for the KLD: --text FILE, or --task TASK [--data FILE] (its own text)")
    if budget.max_accuracy_drop is not None and accuracy is None and eval_config is None:
        raise ProbeError("--max-accuracy-drop needs the task's accuracy at every level: give --task (and --data)")
    s = kld_settings or KLDSettings(chunks=DEFAULT_CHUNKS)

    src = resolve_model(model)
    root = Path(out) if out is not None else Path("runs") / "pick" / ladder_stem(src)
    implied = implied_requantize(model, levels, allow_requantize)
    files = ladder_files(src, levels, allow_requantize=allow_requantize or implied)
    infos = {level: inspect_gguf(path) for level, path in files.items()}
    reference = _highest_precision(infos)
    requantized_from = next((i.metadata.get("ggml_probe.requantized_from") for i in infos.values()
                             if i.metadata.get("ggml_probe.requantized_from")), None)
    notes = []
    if requantized_from:
        notes.append(f"the ladder is requantized from {requantized_from}"
                     + (" (the demo model exists only as Q4_1)" if implied else "")
                     + f": every level carries {requantized_from}'s error, the reference {reference} included, "
                       "so the KLD measures only what each level adds to it")

    if text is not None:
        text_info: dict[str, Any] = {"source": "file" if text_file else "given", "path": str(text_file) if text_file else None}
    else:
        text, text_info = task_text(task, data_path, limit=task_limit,
                                    max_chars=None if s.chunks is None else 16 * s.ctx * s.chunks)
    scored = {level: files[level] for level in levels if level != reference}
    kld = run_kld(scored, files[reference], text, root / "kld", s, progress=progress)
    text_info.update(ctx=kld.n_ctx, chunks=kld.n_chunk, tokens=kld.n_ctx * kld.n_chunk)

    accuracy_source = "given" if accuracy is not None else None
    if accuracy is None and eval_config is not None:
        runs = run_levels(src, eval_config, levels, root / f"eval-{Path(eval_config.task).stem}", reference=reference,
                          allow_requantize=allow_requantize or implied, resume=True, progress=eval_progress)
        accuracy = accuracy_from_comparison(runs.comparison)
        first = next(iter(runs.summaries.values()))
        accuracy_source = f"{eval_config.task}, n={first.n_examples}, {first.manifest['task']['source']}"

    if speed is None and measure_speed is not None:
        speed = measure_speed(dict(files))

    table: dict[str, dict[str, Any]] = {}
    for level in levels:
        info, path = infos[level], files[level]
        ctx_need = level_context(info, run_ctx)
        if ctx_need is None:
            notes.append(f"{level}'s header lacks the sizes for its KV cache: its memory need is its file alone")
        d: dict[str, Any] = {"name": level, "path": str(path), "file_type": info.file_type,
                             "size_bytes": info.size_bytes, "bits_per_weight": info.bits_per_weight,
                             "reference": level == reference,
                             "context_bytes": ctx_need["total_bytes"] if ctx_need else 0,
                             "kv_cache_bytes": ctx_need["kv_cache_bytes"] if ctx_need else None,
                             "compute_bytes": ctx_need["compute_bytes"] if ctx_need else None}
        if level == reference:  # by definition; not scored against itself
            d.update(kld_mean=0.0, kld_mean_se=0.0, kld_p99=0.0, same_top_p=1.0, same_top_p_se=0.0, ppl_ratio=1.0)
        else:
            m = kld.models[level]
            d.update({k: m[k] for k in ("kld_mean", "kld_mean_se", "kld_p99", "kld_median", "kld_max", "same_top_p",
                                        "same_top_p_se", "ppl_ratio", "ppl_ratio_se", "ppl", "ppl_base", "rms_dp")})
        for figures in (accuracy or {}).get(level, {}), (speed or {}).get(level, {}):
            d.update({k: v for k, v in figures.items() if k in ("accuracy_delta", "accuracy_delta_ci", "pp_tokens_per_s",
                                                                  "tg_tokens_per_s", "pp_tokens_per_s_sd", "tg_tokens_per_s_sd")})
        table[level] = d

    chosen = pick(records_from_dicts(table), budget, prefer=prefer)
    result = LadderPick(str(model), reference, dict(files), table, text_info, kld.to_dict(), chosen, requantized_from,
                        notes, run_ctx, accuracy_source, speed_source or ("given" if speed else None))
    write_json(root / "pick.json", result.to_dict())
    return result
