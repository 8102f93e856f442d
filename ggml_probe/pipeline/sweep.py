"""`ggml-probe sweep`: a grid of models × quant levels × tasks and texts, each cell a study's run directory.

    from ggml_probe.pipeline.sweep import load_spec, run_sweep
    result = run_sweep(load_spec("SWEEP.toml"), "sweeps/demo")      # cells one after another, in this process
    result["cells"][0]["figures"]["accuracy"]

A SWEEP.toml names `models` (GGUF paths, store names, `demo`), optional `texts` (plain-text files for the
text KLD; default: the tasks' own text, as in `study`) and any StudyConfig option (`quants`, `tasks`,
`limit`, `[data]`, …); relative paths are read from the file's folder.

Layout of a sweep directory (every model's folder is exactly what `study` writes):

    sweep.json                the spec's hash, every cell's status and figures, each model's pick
    report.html/.md           the merged report across the grid (plots/ beside the markdown)
    <model>/runs/<task>/<LEVEL>/   one cell: an eval run directory (+ cell.json when complete)
    <model>/kld/              the reference's log-probabilities on the text (computed once per model and text)
                              and one cell per other level (cell-<LEVEL>.json)
    <model>/study.json, report.html   the model's study, merged from its cells

Work shared by cells happens once: a model's ladder is built before any cell (on the shared filesystem),
and the reference level's log-probabilities on each text are a job of their own that the text cells of
that model wait for. Cells never depend on each other. An executor runs the jobs: `SequentialExecutor`
here; the Ray one in sweep_ray.py. Each finished cell writes its completeness marker, so a rerun
(or a resumed sweep) skips it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import socket
import time
import tomllib
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

from ..engine.model import Vocab, offload_layers
from ..errors import ProbeError
from ..fsutil import sha256_file
from ..formats.kld_base import KLDBaseReader
from ..models.fetch import fetch_gguf, list_repo_gguf, quant_sort_key
from ..models.ggufinfo import inspect_gguf
from ..models.quant_types import normalize_quant
from ..models.store import DEMO_NAME, resolve_model
from ..report.sweep_page import render_sweep_report
from ..tasks import get_task, load_examples
from .compare import highest_precision
from .evaluation import EvalConfig, ladder_files, task_spec
from .kld import KLDResult, KLDSettings, base_key, score_model, text_tokens, write_base
from .neurons import NeuronAnalysis
from .rundir import directory_lock, read_json, write_json
from .runs import run_level_files
from .study import StudyConfig, resolve_task_data, run_study, study_eval_config, task_text

SWEEP_MANIFEST = "sweep.json"
CELL_MARKER = "cell.json"
SPEC_KEYS = ("models", "texts")  # besides StudyConfig's fields
STUDY_FIELDS = {f.name: f for f in dataclasses.fields(StudyConfig)}
PATH_FIELDS = ("data_dir", "kld_text")  # StudyConfig options that name files, read from the SWEEP.toml's folder


# ------------------------------------------------------------------ the spec


@dataclass
class SweepSpec:
    path: Path
    sha256: str  # of the file's bytes: a sweep directory belongs to one spec
    models: list[str]
    model_paths: dict[str, Path]
    texts: list[Path]
    study: StudyConfig


def _check_type(key: str, value: Any, default: Any, where: str) -> None:
    expected = {bool: bool, int: (int,), float: (int, float), str: str, list: list, dict: dict}
    kind = type(default)
    if default is None or kind not in expected or key == "gpu_layers":  # gpu_layers: 'auto' or a number
        return
    ok = isinstance(value, expected[kind]) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ProbeError(f"{where}: {key} must be {kind.__name__}, not {type(value).__name__} ({value!r})")


# A model from the Hugging Face hub: hf:OWNER/REPO[:QUANT], the GGUF file of that quant (default: the
# highest precision the repo offers), the ladder's source like any local file.
HUB_PREFIX = "hf:"


def hub_model(name: str) -> Path:
    """The local path of a hub model named hf:OWNER/REPO[:QUANT], fetched (or found in the cache offline)."""
    repo_id, _, quant = name[len(HUB_PREFIX):].partition(":")
    if not quant:
        offered = list_repo_gguf(repo_id).quants
        if not offered:
            raise ProbeError(f"{repo_id} offers no GGUF file with a quant in its name")
        quant = min(offered, key=quant_sort_key)
    return fetch_gguf(repo_id, [quant])[0].resolve()


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a SWEEP.toml: every model, level, task, data file and key is checked here, before any work."""
    path = Path(path)
    where = path.name
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProbeError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{where} is not valid TOML: {exc}") from None
    unknown = [k for k in doc if k not in SPEC_KEYS and k not in STUDY_FIELDS]
    if unknown:
        raise ProbeError(f"{where}: unknown key {unknown[0]!r} (keys: models, texts, and the study options "
                         f"{', '.join(k for k in STUDY_FIELDS if k not in ('threads',))})")
    folder = path.resolve().parent

    def local(p: str, what: str) -> Path:
        full = (folder / Path(p).expanduser()) if not Path(p).expanduser().is_absolute() else Path(p).expanduser()
        if not full.exists():
            raise ProbeError(f"{where}: {what} {p} does not exist (read from {folder})")
        return full.resolve()

    models = doc.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise ProbeError(f"{where}: models must be a non-empty list of model names or paths, e.g. models = [\"demo\"]")
    if len(set(models)) != len(models):
        raise ProbeError(f"{where}: model {next(m for m in models if models.count(m) > 1)!r} is listed twice")
    model_paths = {}
    for m in models:
        candidate = folder / m
        try:
            if m.startswith(HUB_PREFIX):
                model_paths[m] = hub_model(m)
            else:
                model_paths[m] = resolve_model(candidate if m != DEMO_NAME and candidate.exists() else m).resolve()
        except ProbeError as exc:
            raise ProbeError(f"{where}: unknown model {m!r}: {exc}") from None
    options = {k: v for k, v in doc.items() if k in STUDY_FIELDS}
    defaults = StudyConfig()
    for key, value in options.items():
        _check_type(key, value, getattr(defaults, key), where)
    for key in PATH_FIELDS:
        if options.get(key):
            options[key] = str(local(options[key], key))
    if "quants" in options:
        try:
            options["quants"] = [normalize_quant(q) for q in options["quants"]]
        except ProbeError as exc:
            raise ProbeError(f"{where}: unknown level: {exc}") from None
    for task in options.get("tasks", defaults.tasks):
        try:
            get_task(task)
        except ProbeError as exc:
            raise ProbeError(f"{where}: unknown task {task!r}: {exc}") from None
    tasks = options.get("tasks", defaults.tasks)
    stray = [t for t in options.get("data") or {} if t not in tasks]
    if stray:
        raise ProbeError(f"{where}: [data] names {stray[0]!r}, which is not one of the tasks ({', '.join(tasks)})")
    options["data"] = {task: str(local(p, f"data file of {task}")) for task, p in (options.get("data") or {}).items()}
    texts = doc.get("texts", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ProbeError(f"{where}: texts must be a list of plain-text files")
    text_paths = [local(t, "text") for t in texts]
    if text_paths:
        options["kld_text"] = str(text_paths[0])  # each model's study scores (and picks by) the first text
    try:
        config = StudyConfig(**options)
    except TypeError as exc:
        raise ProbeError(f"{where}: {exc}") from None
    if config.paper:
        config.apply_paper()
    config.attribution = config.attribution or "exact"
    config.attribution_target = config.attribution_target or "label"
    return SweepSpec(path, hashlib.sha256(raw).hexdigest(), list(models), model_paths, text_paths, config)


# ------------------------------------------------------------------ cells and jobs


@dataclass(frozen=True)
class BaseJob:
    """The reference level's log-probabilities on one text, for one model: done once, read by its text cells."""

    key: str  # model/text
    reference_file: str
    text_file: str
    kld_dir: str
    settings: dict


@dataclass(frozen=True)
class Cell:
    """One (model, level, task-or-text) of the grid. Plain strings and dicts only: a worker gets paths, never models."""

    model: str
    level: str
    kind: str  # "task": an eval run directory; "text": llama-perplexity's KLD against the model's reference
    name: str  # the task run, or the text's name
    model_file: str
    folder: str  # the run directory (task) or the text's KLD directory (text)
    settings: dict  # what the cell runs with (threads and GPU offload included)
    identity: str  # the hash of what makes its results (not the thread count): the completeness marker holds it
    base: str | None = None  # text cells: the BaseJob they read
    force: bool = False

    @property
    def key(self) -> str:
        return f"{self.model}/{self.name}/{self.level}"

    @property
    def marker(self) -> Path:
        folder = Path(self.folder)
        return folder / CELL_MARKER if self.kind == "task" else folder / f"cell-{self.level}.json"

    @property
    def running_marker(self) -> Path:
        folder = Path(self.folder)
        # beside the run directory, not in it: a run directory holds only what `evaluate` writes until it is complete
        return folder.with_name(f"{folder.name}.running") if self.kind == "task" else folder / f"cell-{self.level}.running"


def _file_sha(path: Path) -> str:
    """A file's sha256, hashed once per (path, size, mtime): a sweep names each ladder file in many cells."""
    st = Path(path).stat()
    return _sha_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_done(cell: Cell) -> dict | None:
    """The figures of a finished cell (its completeness marker for this very identity), else None."""
    try:
        marker = read_json(cell.marker)
    except (FileNotFoundError, ProbeError):
        return None
    return marker if marker.get("identity") == cell.identity and marker.get("status") == "complete" else None


def _task_figures(metrics: dict) -> dict[str, Any]:
    ls = metrics["label_set"]
    out = {k: ls[k]["value"] for k in ("accuracy", "mean_confidence", "ace_paper", "ece", "brier", "nll") if k in ls}
    out["paper_accuracy"] = metrics["paper"]["accuracy"]["value"]
    out["n"] = metrics.get("n")
    return out


def _run_task_cell(cell: Cell) -> dict[str, Any]:
    s = cell.settings
    eval_config = EvalConfig(**s["eval"])
    neurons = NeuronAnalysis(**s["neurons"]) if s.get("neurons") else None
    run_dir = Path(cell.folder)
    # The study's own flow for one level: its pass (resumable) and its neuron part, into RUNS/<task>/<LEVEL>.
    runs = run_level_files({cell.level: Path(cell.model_file)}, eval_config, run_dir.parent, resume=True,
                           force=cell.force, neurons=neurons)
    figures = _task_figures(runs.summaries[cell.level].metrics)
    level = (runs.neurons or {}).get(cell.level)
    if level:
        figures.update(dead=level.get("dead"), salient=level.get("salient"), redundant_pairs=level.get("redundant_pairs"))
    return figures


def _run_text_cell(cell: Cell, base_file: str) -> dict[str, Any]:
    model, base = Path(cell.model_file), Path(base_file)
    model_key = sha256_file(model)[:16]
    # The same state file name as run_kld's: an interrupted cell continues after its finished chunks.
    state = Path(cell.folder) / f"state-{model_key}-{base.stem}.npz"
    if cell.force:
        state.unlink(missing_ok=True)
    figures = score_model(model, base, KLDSettings(**cell.settings), state_file=state)
    state.unlink(missing_ok=True)
    figures["model_sha256_16"] = model_key
    return figures


CELL_KINDS: dict[str, Callable[..., dict[str, Any]]] = {"task": _run_task_cell, "text": _run_text_cell}


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ProbeError):
        return str(exc)
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return f"{type(exc).__name__}: {exc}" + (f" ({Path(where.filename).name}:{where.lineno})" if where else "")


def execute_cell(cell: Cell, base: dict | None = None) -> dict[str, Any]:
    """Run one cell in this process and write its completeness marker. A failure of the cell's own
    (a corrupt model, bad data) comes back as {"status": "failed", "error": one line}; the death of
    the process is left to the executor (Ray retries the cell). A text cell gets its BaseJob's outcome:
    when the reference could not be scored on the text (e.g. too short for two chunks) the cell is
    skipped with that note, as the study notes it and goes on."""
    done = None if cell.force else cell_done(cell)
    if done is not None:
        return {"status": "cached", "figures": done["figures"], "seconds": 0.0}
    if cell.kind == "text" and (base is None or base.get("status") != "complete"):
        return {"status": "skipped", "error": f"reference log-probabilities: {(base or {}).get('error', 'missing')}"}
    base_file = base["base_file"] if base else None
    t0 = time.perf_counter()
    running = cell.running_marker
    running.parent.mkdir(parents=True, exist_ok=True)
    running.write_text(f"{os.getpid()}\n")
    try:
        figures = CELL_KINDS[cell.kind](cell, *([base_file] if cell.kind == "text" else []))
    except Exception as exc:  # the cell's own failure: reported, the rest of the sweep goes on
        return {"status": "failed", "error": _one_line(exc), "seconds": time.perf_counter() - t0}
    finally:
        running.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    write_json(cell.marker, {"status": "complete", "identity": cell.identity, "cell": cell.key, "figures": figures,
                             "seconds": seconds, "host": socket.gethostname(), "pid": os.getpid()})
    return {"status": "computed", "figures": figures, "seconds": seconds}


def execute_base(job: BaseJob) -> dict[str, Any]:
    """The reference's log-probabilities on a text (llama-perplexity's base format), once per model and text."""
    try:
        s = KLDSettings(**job.settings)
        text = Path(job.text_file).read_text(encoding="utf-8", errors="replace")
        with Vocab(Path(job.reference_file)) as vocab:
            tokens = text_tokens(vocab, text, s.ctx, s.chunks)
        base = Path(job.kld_dir) / f"base-{base_key(Path(job.reference_file), tokens, s)}.kld"
        if not base.exists():
            base.parent.mkdir(parents=True, exist_ok=True)
            write_base(Path(job.reference_file), tokens, s, base)
        return {"status": "complete", "base_file": str(base)}
    except Exception as exc:
        return {"status": "failed", "error": _one_line(exc)}


# ------------------------------------------------------------------ executors


CellDone = Callable[[Cell, dict], None]


class Executor(Protocol):
    """Runs the shared jobs and the cells; a text cell waits for its BaseJob. Returns outcomes by cell key."""

    threads: int | None
    gpu_layers: str | int | None

    def run(self, bases: dict[str, BaseJob], cells: list[Cell], on_done: CellDone | None) -> dict[str, dict]: ...


@dataclass
class SequentialExecutor:
    """Every job in this process, one after another (the default: no Ray needed)."""

    threads: int | None = None
    gpu_layers: str | int | None = None

    def run(self, bases: dict[str, BaseJob], cells: list[Cell], on_done: CellDone | None = None) -> dict[str, dict]:
        base_outcomes = {key: execute_base(job) for key, job in bases.items()}
        out = {}
        for cell in cells:
            outcome = execute_cell(cell, base_outcomes.get(cell.base) if cell.base else None)
            out[cell.key] = outcome
            if on_done:
                on_done(cell, outcome)
        return out


# ------------------------------------------------------------------ the sweep


def _slug(model: str) -> str:
    name = Path(model).name
    return name[:-5] if name.endswith(".gguf") else name


def _reference(files: dict[str, Path], config: StudyConfig) -> str:
    """The highest-precision level (the study's rule, compare.highest_precision), unless `reference`."""
    if config.reference:
        return normalize_quant(config.reference)
    return highest_precision({lvl: inspect_gguf(path).bits_per_weight for lvl, path in files.items()})


def _check_directory(out: Path, spec: SweepSpec, force: bool) -> None:
    path = out / SWEEP_MANIFEST
    if not path.exists():
        return
    old = read_json(path)
    if old.get("spec_sha256") != spec.sha256 and not force:
        raise ProbeError(f"{out} holds a sweep of another SWEEP.toml ({old.get('spec_path')}, sha256 "
                         f"{str(old.get('spec_sha256'))[:12]}… ≠ {spec.sha256[:12]}…); choose another --out or pass --force")


def plan_cells(spec: SweepSpec, out: Path, executor: Executor, force: bool = False,
               step: Callable[[str], None] | None = None) -> tuple[dict[str, BaseJob], list[Cell], dict[str, Any]]:
    """The grid's jobs: each model's ladder is built here (once), then its cells and reference jobs are listed."""
    config = replace(spec.study, threads=executor.threads,
                     gpu_layers=executor.gpu_layers if executor.gpu_layers is not None else spec.study.gpu_layers)
    bases: dict[str, BaseJob] = {}
    cells: list[Cell] = []
    plan: dict[str, Any] = {}
    for model in spec.models:
        model_dir = out / _slug(model)
        entry = plan.setdefault(model, {"dir": str(model_dir), "error": None})
        if step:
            step(f"{model}: building the quantization ladder")
        try:
            files = ladder_files(spec.model_paths[model], config.quants,
                                 allow_requantize=config.allow_requantize or model == DEMO_NAME)
            files = {lvl: Path(p).resolve() for lvl, p in files.items()}
            reference = _reference(files, config)
        except ProbeError as exc:  # this model's own problem (a corrupt file): reported, the others go on
            entry["error"] = f"ladder: {exc}"
            continue
        entry.update(files={lvl: str(p) for lvl, p in files.items()}, reference=reference)
        neurons = config.neuron_analysis() if config.neurons else None
        texts: dict[str, str] = {}
        for task in config.tasks:
            task_run, data_path, _fallback = resolve_task_data(task, config)
            eval_config = study_eval_config(task_run, data_path, config)
            settings = {"eval": asdict(eval_config), "neurons": asdict(neurons) if neurons else None}
            for level, path in files.items():
                identity = _digest({"model": _file_sha(path), **_without_engine(settings)})
                cell = Cell(model, level, "task", task_run, str(path), str(model_dir / "runs" / task_run / level),
                            settings, identity)
                cells.append(replace(cell, force=force and cell_done(cell) is None))
            examples = load_examples(task_spec(eval_config), data_path=data_path, limit=config.limit,
                                     on_bad_row=eval_config.on_bad_row, seed=config.seed).examples
            texts[task_run] = task_text(examples, data_path)
        if not config.kld:
            continue
        kld_settings = KLDSettings(ctx=config.kld_ctx, chunks=config.kld_chunks, batch=max(2048, config.kld_ctx),
                                   threads=config.threads, gpu_layers=config.gpu_layers)
        text_files: list[tuple[str, Path, Path]] = []  # (name, text file, KLD folder)
        if spec.texts:
            for i, t in enumerate(spec.texts):  # the first text's folder is the one the model's study reads
                text_files.append((t.stem, t, model_dir / ("kld" if i == 0 else f"kld-{t.stem}")))
        else:
            own = model_dir / "kld" / "tasks-text.txt"
            own.parent.mkdir(parents=True, exist_ok=True)
            joined = "\n\n".join(texts.values())
            if not own.exists() or own.read_text(encoding="utf-8") != joined:
                own.write_text(joined, encoding="utf-8")
            text_files.append(("text:" + "+".join(texts), own, model_dir / "kld"))
        for name, text_file, kld_dir in text_files:
            job = BaseJob(f"{model}/{name}", str(files[reference]), str(text_file), str(kld_dir), asdict(kld_settings))
            bases[job.key] = job
            for level, path in files.items():
                if level == reference:
                    continue
                identity = _digest({"model": _file_sha(path), "reference": _file_sha(files[reference]),
                                    "text": sha256_file(text_file), **_without_engine({"kld": asdict(kld_settings)})})
                cell = Cell(model, level, "text", name, str(path), str(kld_dir), asdict(kld_settings), identity,
                            base=job.key)
                cells.append(replace(cell, force=force and cell_done(cell) is None))
    return bases, cells, plan


def _without_engine(settings: dict) -> dict:
    """A cell's settings less the thread count (which does not change results), with GPU offload as llama.cpp
    gets it here (which does): a sequential sweep's cells are reused by a Ray sweep and the other way round."""
    out = json.loads(json.dumps(settings, default=str))
    for part in out.values():
        if isinstance(part, dict):
            part.pop("threads", None)
            if "gpu_layers" in part:
                part["gpu_layers"] = offload_layers(part["gpu_layers"])
    return out


def _write_kld_json(kld_dir: Path, reference_file: str, base_file: str, cells: list[Cell],
                    outcomes: dict[str, dict]) -> None:
    """kld.json as run_kld writes it, from the text cells: the model's study then reads, not recomputes, them."""
    with KLDBaseReader(Path(base_file)) as reader:
        h = reader.header
    result = KLDResult(Path(reference_file).name, Path(base_file), "computed", h.n_ctx, h.n_chunk)
    for cell in cells:
        result.models[cell.level] = outcomes[cell.key]["figures"]
    write_json(kld_dir / "kld.json", result.to_dict())


def _model_summary(study: dict[str, Any]) -> dict[str, Any]:
    """What the merged report reads from one model's study."""
    pick = (study.get("pick") or {}).get("result") or {}
    levels = {lvl: {"bits_per_weight": e["bits_per_weight"], "size_bytes": e["size_bytes"]}
              for lvl, e in study["levels"].items()}
    for lvl, m in ((study.get("kld") or {}).get("models") or {}).items():
        levels[lvl].update(kld_mean=m.get("kld_mean"), kld_p99=m.get("kld_p99"), same_top_p=m.get("same_top_p"))
    tasks = {}
    for task, t in study["tasks"].items():
        rows = {}
        for lvl, run in t["runs"].items():
            rows[lvl] = {"accuracy": run["metrics"]["label_set"]["accuracy"]["value"]}
            c = (t.get("comparison") or {}).get("levels", {}).get(lvl)
            if c and c.get("accuracy_delta"):
                rows[lvl]["accuracy_delta"] = c["accuracy_delta"]["value"]
            n = (t.get("neurons") or {}).get(lvl)
            if n:
                rows[lvl]["redundant_pairs"] = n.get("redundant_pairs")
                rows[lvl]["n_ff"] = n.get("n_ff")
        tasks[task] = rows
    return {"reference": study["study"]["reference"], "pick": pick.get("pick"), "reasons": pick.get("reasons", []),
            "nearest_miss": pick.get("nearest_miss"), "levels": levels, "tasks": tasks,
            "kld_text": (study.get("kld") or {}).get("text_source")}


def run_sweep(spec: SweepSpec, out_dir: str | Path, executor: Executor | None = None, *, force: bool = False,
              on_done: CellDone | None = None, step: Callable[[str], None] | None = None,
              command: str | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep; write sweep.json, each model's study and the merged report. Returns sweep.json's dict."""
    t0 = time.perf_counter()
    executor = executor or SequentialExecutor()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _check_directory(out, spec, force)
    with directory_lock(out):
        previous = read_json(out / SWEEP_MANIFEST) if (out / SWEEP_MANIFEST).exists() else {}
        manifest = {"spec_path": str(spec.path.resolve()), "spec_sha256": spec.sha256,
                    "spec": spec.path.read_text(encoding="utf-8"), "status": "running",
                    "executor": type(executor).__name__, "command": command or ""}
        write_json(out / SWEEP_MANIFEST, manifest)
        bases, cells, plan = plan_cells(spec, out, executor, force, step)
        check = getattr(executor, "check_shared_filesystem", None)
        if check:  # every node must see the sweep directory and the ladder files
            check(out, [Path(f) for m in plan.values() for f in (m.get("files") or {}).values()])
        if step:
            step(f"{len(cells)} cells ({sum(cell_done(c) is not None for c in cells)} finished before), "
                 f"{len(bases)} reference jobs, on {type(executor).__name__}")
        outcomes = executor.run(bases, cells, on_done)
        config = replace(spec.study, threads=executor.threads,
                         gpu_layers=executor.gpu_layers if executor.gpu_layers is not None else spec.study.gpu_layers)
        models: dict[str, Any] = {}
        for model, entry in plan.items():
            mine = [c for c in cells if c.model == model]
            failed = [c.key for c in mine if outcomes[c.key]["status"] == "failed"]
            if entry["error"] or failed:
                models[model] = {"dir": entry["dir"], "error": entry["error"] or f"{len(failed)} cell(s) failed: "
                                 + ", ".join(failed)}
                continue
            # the same spec and cells as the study already merged: read it, do not merge again
            digest = _digest([spec.sha256, sorted(c.identity for c in mine)])
            study_file = Path(entry["dir"]) / "study.json"
            if ((previous.get("models") or {}).get(model) or {}).get("cells_digest") == digest and study_file.exists() \
                    and all(outcomes[c.key]["status"] == "cached" for c in mine):
                models[model] = {"dir": entry["dir"], "cells_digest": digest, **_model_summary(read_json(study_file))}
                continue
            if step:
                step(f"{model}: merging its cells into its study")
            try:
                for job in (b for key, b in bases.items() if key.startswith(f"{model}/")):
                    text_cells = [c for c in mine if c.base == job.key]
                    if all(outcomes[c.key]["status"] in ("computed", "cached") for c in text_cells):
                        base = execute_base(job)  # the base exists: this only names it
                        _write_kld_json(Path(job.kld_dir), job.reference_file, base["base_file"], text_cells, outcomes)
                # the merge reads the cells; the study's own extras (noise floor, speed, trace) are not cells
                merge = replace(config, reference=entry["reference"], noise_floor=False, speed=False, trace=False)
                study = run_study(spec.model_paths[model], merge, entry["dir"], command=command)
                models[model] = {"dir": entry["dir"], "cells_digest": digest, **_model_summary(study)}
            except ProbeError as exc:
                models[model] = {"dir": entry["dir"], "error": str(exc)}
        result = {**manifest, "status": "complete", "seconds": time.perf_counter() - t0,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "cells": [{"model": c.model, "level": c.level, "kind": c.kind,
                             ("task" if c.kind == "task" else "text"): c.name, "dir": c.folder,
                             **outcomes[c.key]} for c in cells],
                  "models": models}
        write_json(out / SWEEP_MANIFEST, result)
        if step:
            step("writing the merged report")
        render_sweep_report(result, out)
        return result
