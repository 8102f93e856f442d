"""The whole study in one call: ladder → one eval pass per level and task → comparisons → weights → report.

    from ggml_probe.pipeline.study import StudyConfig, run_study
    study = run_study("demo", StudyConfig(quants=["F16", "Q8_0", "Q4_0"], tasks=["boolq"], limit=50), "studies/demo")

Layout of a study directory:

    study.json            every figure the report shows, with definitions and provenance
    report.html/.md       the report (plots/ beside the markdown)
    runs/<task>/<LEVEL>/  one eval run directory per task and level (resumable)
    weights/<LEVEL>.json  weight error of each level against the reference
    noise_floor/          the reference run again under changes that carry no quantization (noise_floor.py)
    speed.json            pp/tg tokens/s and memory of every level (bench's measurement), reused on rerun
"""

from __future__ import annotations

import importlib.util
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..analysis.calibration import DEFINITIONS as CAL, reliability_bins
from ..analysis.neurons import DRIFT_DEFINITION
from ..analysis.pick import DEFAULT_MAX_KLD, Budget, pick, records_from_dicts
from ..analysis.scoring import DEFINITIONS as SCORING
from ..attribution import method
from ..errors import HubError, ProbeError
from ..models.ggufinfo import inspect_gguf
from ..models.store import DEMO_NAME, resolve_model
from ..report.changes import what_changed
from ..report.render import render_report
from ..tasks import OFFLINE_TASK, get_task, load_examples
from ..tasks.readers import open_table
from ..weights import compare_weights
from . import DEFAULT_BATCH_PROMPTS
from .compare import reference_level
from .evaluation import EvalConfig, ladder_files, task_spec
from .kld import KLDSettings, run_kld
from .neurons import TARGET_DEFINITIONS, NeuronAnalysis
from .noise_floor import study_floor
from .pick import DEFAULT_RUN_CTX, accuracy_from_comparison, level_context
from .rundir import directory_lock, read_json, write_json
from .runs import RunProgress, run_level_files
from .trace import TraceSettings, run_trace, trace_key
from .speed import BenchSettings, bench_files


DEFAULT_QUANTS = ["F16", "Q8_0", "Q4_K_M", "Q4_0"]


StudyProgress = RunProgress  # a bar per (level, task) run, a line per step


@dataclass
class StudyConfig:
    quants: list[str] = field(default_factory=lambda: list(DEFAULT_QUANTS))
    tasks: list[str] = field(default_factory=lambda: ["boolq"])
    data: dict[str, str] = field(default_factory=dict)  # task → local file
    data_dir: str | None = None  # a folder searched for <task>*.jsonl|csv|parquet
    limit: int | None = 100
    seed: int | None = 0  # a seeded sample: data files are often sorted by label
    layers: str = "0,14,-1"
    neuron: str = "act"
    tau: float = 0.1
    saliency: float = 0.7
    paper: bool = False
    neurons: bool = True
    salient_examples: int = 10  # prompts attributed (salient neurons)
    attribution: str | None = None  # ggml_probe.attribution.CHOICES; None: exact (ig in paper mode with torch)
    # label: the label the model chose (label-set scoring), as the token it emits for it after the prompt;
    # answer: the full-vocabulary argmax (the paper's); gold: the gold label. None: answer in paper mode, else label
    attribution_target: str | None = None
    attribution_device: str = "auto"  # torch device for --attribution ig
    ablate_top: int = 5  # causal check: switch off each layer's top-N salient candidates (0: skip)
    weights: bool = True
    reference: str | None = None
    allow_requantize: bool = False
    n_ctx: int = 2048
    threads: int | None = None
    gpu_layers: str | int = "auto"
    batch_prompts: int = DEFAULT_BATCH_PROMPTS  # prompts per llama_decode (EvalConfig.batch_prompts)
    n_boot: int = 1000
    kld: bool = True  # llama-perplexity's text KLD of every level against the reference
    kld_text: str | None = None  # a plain-text file; None: the tasks' own text (e.g. BoolQ passages)
    kld_ctx: int = 256
    kld_chunks: int | None = 8  # at most this many chunks of the text (None: all)
    pick: bool = True  # which level to run (analysis.pick), from the text KLD, sizes and accuracy changes
    max_kld: float | None = DEFAULT_MAX_KLD
    max_p99_kld: float | None = None
    max_accuracy_drop: float | None = None  # points, on any task
    memory_bytes: int | None = None  # None: this machine's available memory
    run_ctx: int = DEFAULT_RUN_CTX  # the context the pick's memory need assumes
    trace: bool = True  # where the error enters (pipeline.trace), per level, on the text KLD's text
    trace_ctx: int = 128  # tokens per chunk of the trace
    trace_tokens: int = 128  # tokens traced per level: one chunk keeps the study fast (2 + n_layer + 1 decodes)
    trace_layers: str | None = None  # blocks compared and patched (layerspec); None: every block
    redundancy: bool = True  # the neurons' pairwise correlations (n_ff² floats per layer)
    redundancy_budget: int | None = None  # bytes they may take (None: the default); over it, a subset, noted
    redundancy_full: bool = False  # every neuron, or a one-line refusal over the budget
    noise_floor: bool = True  # the reference against itself under batch layout, flash attention, threads
    speed: bool = True  # bench's pp/tg tokens/s and memory per level, small by default to keep the study fast
    speed_prompt: int = 128
    speed_gen: int = 32
    speed_reps: int = 2

    def apply_paper(self) -> None:
        """The reference study's exact protocol (study-protocol.md)."""
        self.layers, self.neuron, self.tau, self.saliency = "0,14,-1", "act", 0.1, 0.7
        # The paper attributes every analysed layer; only torch can do layers before the last.
        if self.attribution is None and importlib.util.find_spec("torch") is not None:
            self.attribution = "ig"
        if self.attribution_target is None:  # the paper attributes the model's own (argmax) answer token
            self.attribution_target = "answer"

    def neuron_analysis(self) -> NeuronAnalysis:
        """The settings of the neuron part (the same as `eval --neurons`'s), with run_study's defaults."""
        return NeuronAnalysis(layers=self.layers, neuron=self.neuron, tau=self.tau, saliency=self.saliency,
                              salient_examples=self.salient_examples, attribution=self.attribution or "exact",
                              attribution_target=self.attribution_target or "label",
                              attribution_device=self.attribution_device, ablate_top=self.ablate_top,
                              redundancy=self.redundancy, redundancy_budget=self.redundancy_budget,
                              redundancy_full=self.redundancy_full,
                              n_ctx=self.n_ctx, threads=self.threads, gpu_layers=self.gpu_layers)


def _local_data_for(task: str, config: StudyConfig) -> str | None:
    if task in config.data:
        return config.data[task]
    if not config.data_dir:
        return None
    folder = Path(config.data_dir)
    if not folder.is_dir():
        return None
    stem = task.split("-")[0]
    for suffix in (".jsonl", ".parquet", ".csv", ".json"):
        hits = sorted(folder.glob(f"{stem}*{suffix}"))
        if hits:
            return str(hits[0])
    return None


def resolve_task_data(task: str, config: StudyConfig) -> tuple[str, str | None, str | None]:
    """(task actually run, local data path or None, the task it stands in for when it is a fallback).

    Order: --data for the task, a matching file in --data-dir, the task's own source (the hub);
    when that cannot be reached, the built-in yes/no task, and the report says so.
    """
    local = _local_data_for(task, config)
    if local:
        return task, local, None
    spec = get_task(task)
    try:
        load_examples(spec, limit=1)
        return task, None, None
    except HubError:
        return OFFLINE_TASK, None, task


def study_eval_config(task_run: str, data_path: str | None, config: StudyConfig) -> EvalConfig:
    """The eval settings of one task's runs in a study (a sweep's cells use the very same)."""
    return EvalConfig(task=task_run, data_path=data_path, limit=config.limit, seed=config.seed,
                      n_ctx=config.n_ctx, threads=config.threads, gpu_layers=config.gpu_layers,
                      batch_prompts=config.batch_prompts, n_boot=config.n_boot)


def _level_entry(run_manifest: dict) -> dict[str, Any]:
    m = run_manifest["model"]
    return {"file_type": m["file_type"], "path": m["path"], "sha256": m["sha256"], "size_bytes": m["size_bytes"],
            "bits_per_weight": m["bits_per_weight"], "tensor_types": m["tensor_types"],
            "loaded_tensor_types": run_manifest["engine"].get("loaded_tensor_types"),
            "requantized_from": m.get("requantized_from"), "engine": run_manifest["engine"]}


def _reliability(run_dir: Path) -> dict[str, list]:
    import pandas as pd

    df = pd.read_parquet(run_dir / "predictions.parquet")
    return {"label_set": reliability_bins(df["confidence"], df["correct"]).rows(),
            "paper": reliability_bins(df["paper_confidence"], df["paper_correct"]).rows()}


def run_study(model: str | Path, config: StudyConfig, out_dir: str | Path, *, force: bool = False,
              progress: StudyProgress | None = None, command: str | None = None) -> dict[str, Any]:
    """Run (or resume) a study and write study.json and the report. Returns the study dict."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if config.paper:
        config.apply_paper()
    config.attribution = config.attribution or "exact"
    if config.speed:  # bad speed settings fail before any pass, not after them
        try:
            BenchSettings(n_prompt=config.speed_prompt, n_gen=config.speed_gen, reps=config.speed_reps)
        except ProbeError as exc:
            raise ProbeError(f"the speed table (--speed {config.speed_prompt},{config.speed_gen},"
                             f"{config.speed_reps}): {exc}") from None
    if config.trace:  # a chunk never longer than the tokens traced
        config.trace_ctx = min(config.trace_ctx, config.trace_tokens)
    config.attribution_target = config.attribution_target or "label"
    src = resolve_model(model)
    allow = config.allow_requantize or str(model) == DEMO_NAME
    with directory_lock(out):
        if progress:
            progress.step("building the quantization ladder")
        files = ladder_files(src, config.quants, allow_requantize=allow)
        study: dict[str, Any] = {"tasks": {}, "levels": {}, "weights": {}}
        task_texts: dict[str, str] = {}
        floor_tasks: dict[str, dict[str, Any]] = {}
        for task in config.tasks:
            task_run, data_path, fallback_from = resolve_task_data(task, config)
            eval_config = study_eval_config(task_run, data_path, config)
            # The same flow as `eval --neurons`: each level's pass (resumable), the comparison, the neuron part.
            runs = run_level_files(files, eval_config, out / "runs" / task_run, reference=config.reference,
                                   resume=not force, force=force, progress=progress,
                                   neurons=config.neuron_analysis() if config.neurons else None)
            for level, run_dir in runs.run_dirs.items():
                manifest = read_json(run_dir / "manifest.json")
                study["levels"].setdefault(level, _level_entry(manifest))
            study["tasks"][task_run] = {
                "data": {**manifest["task"], "fallback_from": fallback_from},
                "runs": {lvl: {"run_dir": str(s.run_dir), "metrics": s.metrics} for lvl, s in runs.summaries.items()},
                "comparison": runs.comparison,
                "reliability": {lvl: _reliability(d) for lvl, d in runs.run_dirs.items()},
            }
            task_texts[task_run] = task_text(_examples(eval_config), data_path)
            floor_tasks[task_run] = {"eval_config": eval_config}
            if config.neurons:
                study["tasks"][task_run]["neurons"] = runs.neurons
                study["tasks"][task_run]["neuron_comparison"] = runs.neuron_comparison or {}
        reference = config.reference or reference_level(
            {lvl: Path(r["run_dir"]) for lvl, r in next(iter(study["tasks"].values()))["runs"].items()})
        if config.weights:
            shas = {lvl: entry["sha256"] for lvl, entry in study["levels"].items()}
            study["weights"] = _weights_section(files, reference, out, force, progress, shas)
        if config.kld:
            study["kld"] = _kld_section(files, reference, config, out, task_texts, progress)
        if config.noise_floor:
            study["noise_floor"] = _noise_floor_section(files, reference, config, out, study, floor_tasks, force,
                                                        progress)
        if config.speed:
            study["speed"] = _speed_section(files, config, out, study, force, progress)
        if config.kld:
            if config.pick and (study["kld"].get("models") or len(files) == 1):
                study["pick"] = _pick_section(files, reference, study, config)
        if config.trace:
            study["trace"] = _trace_section(files, reference, config, out, task_texts, study["levels"], force, progress)
        study["study"] = {
            "model": str(model), "model_path": str(src), "quants": list(files), "reference": reference,
            "tasks": list(study["tasks"]), "mode": "paper" if config.paper else "default",
            "config": asdict(config), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tool": {"ggml_probe": __version__, "python": platform.python_version(), "platform": platform.platform()},
            "command": command or "", "seconds": time.perf_counter() - t0,
            "definitions": _definitions(config),
            "notes": _notes(study),
        }
        study["what_changed"] = what_changed(study)
        write_json(out / "study.json", study)
        if progress:
            progress.step("writing the report")
        render_report(study, out)
        return study


def _notes(study: dict[str, Any]) -> list[str]:
    """What the study shrank to fit and how to get the whole of it (each distinct note once)."""
    notes = [n.get("redundancy_note") for t in study["tasks"].values() for n in (t.get("neurons") or {}).values()]
    return list(dict.fromkeys(n for n in notes if n))


def _weights_section(files: dict[str, Path], reference: str, out: Path, force: bool,
                     progress: StudyProgress | None, shas: dict[str, str]) -> dict[str, Any]:
    section = {}
    for level, path in files.items():
        if level == reference:
            continue
        cache = out / "weights" / f"{level}.json"
        pair = [shas[level], shas[reference]]
        if cache.exists() and not force:
            cached = read_json(cache)
            if cached.get("sha256_pair") == pair:
                section[level] = cached["summary"]
                continue
        if progress:
            progress.step(f"weight error {level} vs {reference}")
        report = compare_weights(path, files[reference], tensors="ffn_*,attn_*")
        summary = {"total": report.to_dict(with_units=False)["total"],
                   "layers": [s.to_dict() for s in report.layers],
                   "top_neurons": [n.to_dict() for n in report.top_neurons[:20]]}
        write_json(cache, {"sha256_pair": pair, "summary": summary})
        section[level] = summary
    return section


def _examples(eval_config: EvalConfig) -> list:
    data = load_examples(task_spec(eval_config), data_path=eval_config.data_path, limit=eval_config.limit,
                         on_bad_row=eval_config.on_bad_row, seed=eval_config.seed)
    return data.examples


def task_text(examples, data_path: str | None = None) -> str:
    """A task's own running text for the text KLD: each sampled row's longest text column (BoolQ's passage,
    a Jigsaw comment; read from the local data file, whose columns the prompt may not all use), each
    distinct one once, in the sample's order. Without a local file: the longest template field."""
    rows: dict[int, dict] = {}
    if data_path:
        table = open_table(Path(data_path))
        rows = {n: r for n, r in table.records(table.columns) if isinstance(r, dict)}
    seen, parts = set(), []
    for ex in examples:
        values = rows.get(ex.index) or ex.fields or {}
        longest = max((v for v in values.values() if isinstance(v, str)), key=len, default=ex.prompt)
        if longest not in seen:
            seen.add(longest)
            parts.append(longest)
    return "\n\n".join(parts)


def _labelled_progress(progress: StudyProgress | None, stage: str) -> Callable[[str, int, int], None]:
    """progress(label, done, total) for work that reports per label (a level, a file): one bar per label."""
    trackers: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        if progress is None:
            return
        if label not in trackers:
            trackers[label] = progress.run(f"{stage} · {label}")
        if trackers[label]:
            trackers[label](done, total)

    return update


def _study_text(config: StudyConfig, task_texts: dict[str, str]) -> tuple[str, str]:
    """The text of the text KLD and the trace, and what it is: --kld-text, else the tasks' own text."""
    if config.kld_text:
        return Path(config.kld_text).read_text(encoding="utf-8", errors="replace"), config.kld_text
    return ("\n\n".join(task_texts.values()),
            f"the tasks' own text ({', '.join(task_texts)}: each sampled row's longest text column)")


def _kld_section(files: dict[str, Path], reference: str, config: StudyConfig, out: Path, task_texts: dict[str, str],
                 progress: StudyProgress | None) -> dict[str, Any]:
    """llama-perplexity's statistics of every level against the reference on one text (kld.py)."""
    text, source = _study_text(config, task_texts)
    settings = KLDSettings(ctx=config.kld_ctx, chunks=config.kld_chunks, batch=max(2048, config.kld_ctx),
                           threads=config.threads, gpu_layers=config.gpu_layers)
    levels = {lvl: path for lvl, path in files.items() if lvl != reference}
    track = _labelled_progress(progress, "text KLD")
    if progress:
        progress.step(f"text KLD against {reference} ({source})")
    try:
        result = run_kld(levels, files[reference], text, out / "kld", settings,
                         progress=lambda done, total, label: track(label, done, total))
    except ProbeError as exc:  # e.g. a text shorter than two chunks: say so, keep the rest of the study
        return {"text_source": source, "note": str(exc)}
    return {"text_source": source, **result.to_dict(), "settings": asdict(settings)}


def _trace_section(files: dict[str, Path], reference: str, config: StudyConfig, out: Path, task_texts: dict[str, str],
                   levels: dict[str, Any], force: bool, progress: StudyProgress | None) -> dict[str, Any]:
    """Where each level's error enters (pipeline.trace) on the text KLD's text; each level's trace is saved in
    trace/<LEVEL>.json under a key of both files, the text and the settings, and reused on a rerun."""
    text, source = _study_text(config, task_texts)
    settings = TraceSettings(ctx=config.trace_ctx, tokens=config.trace_tokens, layers=config.trace_layers,
                             threads=config.threads, gpu_layers=config.gpu_layers)
    section: dict[str, Any] = {"text_source": source, "settings": asdict(settings), "levels": {}}
    for level, path in files.items():
        if level == reference:
            continue
        cache = out / "trace" / f"{level}.json"
        key = trace_key(levels[level]["sha256"], levels[reference]["sha256"], text, settings)
        cached = read_json(cache) if cache.exists() and not force else {}
        if cached.get("key") == key:
            section["levels"][level] = cached["trace"]
            continue
        if progress:
            progress.step(f"trace {level} vs {reference}: where the error enters")
        tracker = progress.run(f"trace · {level}") if progress else None
        try:
            trace = run_trace(path, files[reference], text, settings, progress=tracker or None)
        except ProbeError as exc:  # e.g. a text shorter than one chunk: say so, keep the rest of the study
            section["note"] = str(exc)
            break
        write_json(cache, {"key": key, "trace": trace})
        section["levels"][level] = trace
    return section


def _noise_floor_section(files: dict[str, Path], reference: str, config: StudyConfig, out: Path,
                         study: dict[str, Any], floor_tasks: dict[str, dict[str, Any]], force: bool,
                         progress: StudyProgress | None) -> dict[str, Any]:
    """The reference's perturbed passes on every task and its text KLD against itself (noise_floor.py)."""
    for task, t in floor_tasks.items():
        runs = study["tasks"][task]["runs"]
        t["run_dir"] = runs[reference]["run_dir"]
        t["neurons"] = (study["tasks"][task].get("neurons") or {}).get(reference)
        t["levels"] = {lvl: (files[lvl], Path(r["run_dir"])) for lvl, r in runs.items() if lvl != reference}
    kld = study.get("kld") or {}
    settings = KLDSettings(**kld["settings"]) if kld.get("settings") else None
    return study_floor(reference, files[reference], floor_tasks, out / "noise_floor",
                       neurons=config.neuron_analysis() if config.neurons else None,
                       kld_base=Path(kld["base_file"]) if kld.get("base_file") else None, kld_settings=settings,
                       force=force, progress=progress)


def _speed_section(files: dict[str, Path], config: StudyConfig, out: Path, study: dict[str, Any], force: bool,
                   progress: StudyProgress | None) -> dict[str, Any]:
    """bench's speed and memory of every level (pipeline.speed), cached in speed.json by file and settings."""
    settings = BenchSettings(n_prompt=config.speed_prompt, n_gen=config.speed_gen, reps=config.speed_reps,
                             threads=config.threads, gpu_layers=config.gpu_layers)
    key = {"sha256": {lvl: study["levels"][lvl]["sha256"] for lvl in files}, "settings": asdict(settings)}
    cache = out / "speed.json"
    if cache.exists() and not force:
        cached = read_json(cache)
        if cached.get("key") == key:
            return cached["result"]
    t0 = time.perf_counter()
    bench_progress = _labelled_progress(progress, "speed")
    if progress:
        progress.step(f"speed: pp{settings.n_prompt} / tg{settings.n_gen}, {settings.reps} repetitions per level")
    result = {**bench_files(files, settings, bench_progress).to_dict(), "seconds": time.perf_counter() - t0}
    write_json(cache, {"key": key, "result": result})
    return result


def _pick_section(files: dict[str, Path], reference: str, study: dict[str, Any],
                  config: StudyConfig) -> dict[str, Any]:
    """Which level to run: the smallest within the quality budget (text KLD; the worst accuracy change over
    the tasks) that fits the memory budget, with the Pareto frontier and the reasons (analysis.pick)."""
    kld = study["kld"].get("models") or {}
    levels: dict[str, dict[str, Any]] = {}
    for level, path in files.items():
        entry = study["levels"][level]
        context = level_context(inspect_gguf(path), config.run_ctx)
        rec: dict[str, Any] = {"size_bytes": entry["size_bytes"], "bits_per_weight": entry["bits_per_weight"],
                               "context_bytes": (context or {}).get("total_bytes", 0)}
        if level == reference:
            rec.update(kld_mean=0.0, kld_p99=0.0, same_top_p=1.0, reference=True)
        elif level in kld:
            rec.update({k: kld[level][k] for k in ("kld_mean", "kld_mean_se", "kld_p99", "same_top_p")})
        # the worst accuracy change over the tasks, with its paired interval (points)
        drops = [accuracy_from_comparison(t["comparison"]).get(level) for t in study["tasks"].values()
                 if t.get("comparison")]
        drops = [d for d in drops if d is not None]
        if drops:
            rec.update(min(drops, key=lambda d: d["accuracy_delta"]))
        speed = ((study.get("speed") or {}).get("levels") or {}).get(level) or {}
        rec.update({k: speed[k] for k in ("pp_tokens_per_s", "tg_tokens_per_s") if speed.get(k) is not None})
        levels[level] = rec
    budget = Budget(max_kld=config.max_kld, max_p99_kld=config.max_p99_kld,
                    max_accuracy_drop=config.max_accuracy_drop, memory_bytes=config.memory_bytes)
    result = pick(records_from_dicts(levels), budget)
    return {"levels": levels, "run_ctx": config.run_ctx, "result": result.to_dict()}


def _definitions(config: StudyConfig) -> dict[str, str]:
    return {
        "mode": ("paper: the reference study's protocol (question-only BoolQ prompts, full-vocabulary confidence, "
                 "layers 0/14/last, act neurons, tau 0.1, saliency 0.7)") if config.paper else
                ("default: label-set scoring as the headline (paper scoring recorded beside it), ECE/Brier/NLL "
                 "added, bootstrap intervals, IG convergence flagged"),
        "scoring_label_set": SCORING["label_set"], "scoring_paper": SCORING["paper"],
        **{f"metric_{k}": v for k, v in CAL.items()},
        "reference_level": "the highest-precision level of the ladder (bits per weight), unless --ref",
        "neuron_drift": DRIFT_DEFINITION,
        "dead": f"a neuron is dead when every value it takes over every prompt token lies in (−τ, τ), τ = {config.tau}",
        "salient": f"|attribution| / max per example above {config.saliency}; the union over the attributed examples",
        "attribution": (f"{config.attribution}: {method(config.attribution).label}; target: "
                        + TARGET_DEFINITIONS[config.attribution_target or "label"]
                        if config.attribution != "none" else "none (salient neurons not computed)"),
        "redundant": "pairs of neurons of a layer whose Pearson correlation over tokens has |corr| ≥ 0.9",
        "text_kld": ("llama-perplexity --kl-divergence's statistics (tools/perplexity/perplexity.cpp): chunks of "
                     f"{config.kld_ctx} tokens, the second half of each scored; KLD = Σ p_ref·(log p_ref − log p) "
                     "over the reference's tokens above −16 nats; same top p = the share of positions whose argmax "
                     "token equals the reference's; RMS Δp = RMS of the change in the actual next token's probability"),
        "pick": ("the smallest level whose text KLD (mean, p99) and worst accuracy change over the tasks stay within "
                 "the budget and whose file plus KV cache and compute buffers at the run context fit the memory "
                 "budget; the Pareto frontier over size × mean KLD (× accuracy where measured)"),
        "trace": ("where the error enters (ggml-probe trace): per block, the relative error ‖q−r‖/‖r‖ and cosine of "
                  "kqv_out, attn_out, ffn_out and l_out against the reference's (mean over tokens); KL ≤ k = the KL of "
                  "the reference model run with its residual stream after block k replaced by the level's (embedding "
                  "and blocks ≤ k quantized); its steps add up to the level's KL"),
        "noise_floor": ("the reference level run again under changes that carry no quantization (prompts packed "
                        "per decode, flash attention switched, another thread count), each compared with its own "
                        "run; per metric the largest change over them. An effect no larger is within the floor"),
        "speed": ("llama-bench's protocol (ggml-probe bench): ppN = N random tokens in one decode, tgN = N tokens "
                  "one at a time; tokens/s mean ± sd over the repetitions after a warm-up; memory: peak RSS"),
        "weights": "per tensor: relative RMSE ‖W−W_ref‖/‖W_ref‖, SQNR 10·log10(‖W_ref‖²/‖W−W_ref‖²), cosine, max |ΔW|",
    }
