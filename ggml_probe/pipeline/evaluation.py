"""The output-level study of one model on one task: one llama.cpp pass, a resumable run directory.

    from ggml_probe.pipeline.evaluation import EvalConfig, evaluate
    summary = evaluate("demo", EvalConfig(task="boolq", data_path="boolq_validation.jsonl", limit=100), "runs/demo-boolq")
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import __version__
from ..analysis import scoring
from ..analysis.calibration import accuracy, bootstrap_ci, calibration_summary, plot_reliability, reliability_bins
from ..engine.imatrix_capture import imatrix_probe_for
from ..engine.llama_lib import versions
from ..engine.model import Engine, Vocab, offload_layers
from ..engine.probes import ProbeSet, run_checked
from ..errors import ProbeError
from ..formats.imatrix import write_imatrix
from ..fsutil import atomic_output, sha256_file
from ..models.ggufinfo import inspect_gguf
from ..models.quant_types import normalize_quant
from ..models.quantize import ladder_stem, quantize_ladder
from ..models.store import resolve_model
from ..tasks import get_task, load_examples, make_task
from ..tasks.loading import choice_count
from ..tasks.spec import generic_task_name, positional_gold_values
from ..tasks.answers import label_answers, single_token_forms
from . import DEFAULT_BATCH_PROMPTS
from .expert_stats import neuron_pass_for
from .rundir import directory_lock, read_json, save_npy, save_npz, write_json
from .tokens import CHUNKS, example_tokens, pack_tokens


MANIFEST = "manifest.json"
# 2: prompts longer than the context keep their template (BOS, instruction, the tail up to the answer)
# and lose the end of their longest field instead of their beginning; checkpoints store the tokens.
# 3: labels are scored by their answer tokens after each prompt (tasks.answers), several-token answers
# by their log-likelihood; checkpoints store the answer tokens and log-likelihoods.
DEFINITIONS_VERSION = 3
NEURON_STATE = "neuron_state"
IMATRIX_STATE = "imatrix_state"

# Called as progress(done, total) after every finished chunk.
ProgressFn = Callable[[int, int], None]


@dataclass
class NeuronSettings:
    """The neuron analyses that ride along the eval pass (issue 4; study-protocol.md)."""

    layers: str = "0,14,-1"
    definitions: tuple[str, ...] = ("act",)
    tau: float = 0.1
    redundancy: bool = True
    redundancy_threshold: float = 0.9
    cluster_threshold: float = 0.3
    top_k: int = 10  # top-activating tokens kept per neuron
    allow_large: bool = False
    # bytes the correlations may take (None: analysis.neurons.DEFAULT_REDUNDANCY_BUDGET); over it an evenly
    # spaced subset of each layer's neurons is correlated, and the run says so
    redundancy_budget: int | None = None
    redundancy_full: bool = False  # every neuron: refused in one line over the budget (None: available memory)


@dataclass
class EvalConfig:
    task: str = "boolq"  # a task name, a path to a task TOML, or a name for a --template task
    data_path: str | None = None
    template: str | None = None  # a generic task: prompt template over the data's columns
    labels: tuple[str, ...] | None = None
    gold_column: str | None = None
    # a generic task's gold values → label words, e.g. (("0", "No"), ("1", "Yes")); without it integer
    # gold labels map by position in `labels` (tasks.spec.positional_gold_values)
    label_map: tuple[tuple[str, str], ...] | None = None
    id_column: str | None = None
    # a generic multiple-choice task: one column holding each example's list of choices, or one column per choice
    choices_columns: tuple[str, ...] | None = None
    limit: int | None = None
    seed: int | None = None
    on_bad_row: str = "fail"
    n_ctx: int = 2048
    threads: int | None = None
    gpu_layers: str | int = "auto"
    # sequences per llama_decode (1: results independent of batch layout); DEFAULT_BATCH_PROMPTS, the CLI's
    # --batch default too: one checkpoint chunk (benchmarks/passes.md)
    batch_prompts: int = DEFAULT_BATCH_PROMPTS
    # a batch's common prefix (the task's instruction) decoded once, its KV cells shared (batch_prompts > 1)
    share_prefix: bool = True
    flash_attn: bool = False  # llama.cpp's flash attention (moves the logits on CPU; see engine.model)
    chunk_size: int = 32  # examples per checkpoint
    # probe states (neuron statistics, imatrix sums: up to hundreds of MB) are saved after a chunk only when
    # this many seconds have passed since the last one, and after the last chunk; a resumed run recomputes
    # the chunks after the last state (0: after every chunk)
    state_every_s: float = 30.0
    save_logits: bool = True
    n_boot: int = 1000
    neurons: NeuronSettings | None = None
    imatrix_out: str | None = None  # also write an imatrix (llama.cpp's format) from this pass's own inputs

    def __post_init__(self) -> None:
        if self.template is not None:  # a generic task is named after itself, never after a shipped task
            self.task = generic_task_name(self.task, self.data_path)
        if self.label_map is not None:
            self.label_map = tuple((str(k), str(v)) for k, v in (self.label_map.items() if isinstance(self.label_map, dict)
                                                                 else self.label_map))

    def identity(self) -> dict[str, Any]:
        """The settings that change results (a resumed run must match them).

        The decode's numerics are part of it: the batch layout, flash attention and GPU offload each
        move the logits (README, engine notes), so a run is never continued with other ones. Each
        joins only when it differs from the CPU defaults, so runs made before still resume.
        """
        out = {"task": self.task, "template": self.template, "labels": list(self.labels or []) or None,
               "gold_column": self.gold_column, "limit": self.limit,
               "neurons": _neuron_identity(self.neurons), "seed": self.seed, "on_bad_row": self.on_bad_row,
               "n_ctx": self.n_ctx}
        if self.batch_prompts != 1:
            out["batch_prompts"] = self.batch_prompts
            if self.share_prefix:
                out["share_prefix"] = True
        if self.flash_attn:
            out["flash_attn"] = True
        gpu = offload_layers(self.gpu_layers)  # what llama.cpp will offload here: 0 without a GPU backend
        if gpu:
            out["gpu_layers"] = gpu
        if self.label_map:
            out["label_map"] = [list(kv) for kv in self.label_map]
        if self.choices_columns:
            out["choices_columns"] = list(self.choices_columns)
        if self.imatrix_out:  # only when asked, so runs made before the option still resume
            out["imatrix"] = True  # the sums must cover every example: resuming without it is refused
        return out


def _neuron_identity(neurons: NeuronSettings | None) -> dict[str, Any] | None:
    """The neuron settings as a run's identity: the redundancy budget's fields only when set, so runs made
    before them still resume."""
    if neurons is None:
        return None
    out = asdict(neurons)
    for key, default in (("redundancy_budget", None), ("redundancy_full", False)):
        if out.get(key) == default:
            out.pop(key)
    return out


@dataclass
class RunSummary:
    run_dir: Path
    model: str
    quant: str | None
    n_examples: int
    metrics: dict[str, Any]
    seconds: float
    resumed_examples: int = 0
    truncated_examples: int = 0
    bad_rows: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)


def _model_identity(path: Path) -> dict[str, Any]:
    info = inspect_gguf(path)
    return {
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "size_bytes": info.size_bytes,
        "architecture": info.architecture,
        "name": info.name,
        "file_type": info.file_type,
        "tensor_types": info.tensor_types,
        "bits_per_weight": info.bits_per_weight,
        "requantized_from": info.metadata.get("ggml_probe.requantized_from"),
    }


def task_spec(config: EvalConfig):
    """The task definition: a named/TOML task, or one built from --template/--labels/--gold-column.

    A generic task's gold values: label words as they are (case-insensitive), plus --label-map when
    given, else integers by position in --labels (0 → the first word). Its labels are --labels, or the
    words of --label-map in the order given."""
    if config.template is None:
        for given, option in ((config.label_map, "--label-map"), (config.choices_columns, "--choices-column")):
            if given:
                raise ProbeError(f"{option} is for a --template task; task {config.task} defines its own")
        return get_task(config.task)
    if config.choices_columns:
        return _choice_task_spec(config)
    mapping = dict(config.label_map or ())
    labels = list(config.labels or dict.fromkeys(mapping.values()))
    if not labels or not config.gold_column:
        raise ProbeError(f"task {config.task}: a --template task also needs --labels (or --label-map) and --gold-column")
    if not config.data_path:
        raise ProbeError(f"task {config.task}: a --template task needs --data FILE")
    gold_values = mapping or positional_gold_values(labels)
    return make_task(config.template, labels, config.gold_column, config.id_column, name=config.task,
                     gold_values=gold_values)


def _choice_task_spec(config: EvalConfig):
    """A generic multiple-choice task (--choices-column): one list column (its count from --labels, else from
    the data's first row) or one column per choice; gold is the right choice's 0-based index."""
    cols = config.choices_columns
    if not config.gold_column or not config.data_path:
        raise ProbeError(f"task {config.task}: a --template task with --choices-column also needs --gold-column "
                         "(the right choice's 0-based index) and --data FILE")
    if config.label_map:
        raise ProbeError(f"task {config.task}: --label-map is for label words; a multiple-choice task's gold is the "
                         "right choice's index")
    if len(cols) == 1:
        count = len(config.labels) if config.labels else choice_count(config.data_path, cols[0], config.task)
        choices = {"column": cols[0], "count": count}
    else:
        choices = {"columns": list(cols)}
    return make_task(config.template, config.labels, config.gold_column, config.id_column, name=config.task,
                     choices=choices)


def label_tokens_for(engine, labels: Sequence[str], prompt: str) -> scoring.LabelTokens:
    """The tokens whose next-token logits stand for each label after `prompt` (its single-token forms:
    the answer ' W' and the glued 'W', as tasks.answers reads them after the prompt). Refuses labels
    whose answer after this prompt is not one token: those are scored by log-likelihood (_run_chunk)."""
    tokens = engine.tokenize(prompt)
    forms = single_token_forms(label_answers(engine, prompt, labels, tokens), len(tokens))
    if forms is None:
        raise ProbeError(f"after {prompt[-30:]!r} some label's answer is not one token; it is scored by its log-likelihood")
    return scoring.LabelTokens(tuple(labels), forms)


def prepare_run_dir(run_dir: Path, identity: dict[str, Any], resume: bool, force: bool) -> dict[str, Any] | None:
    """Decide what to do with an existing run directory; returns the old manifest when resuming."""
    manifest_path = run_dir / MANIFEST
    if not manifest_path.exists():
        if run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir()) and not force:
            raise ProbeError(f"{run_dir} exists and is not a ggml-probe run; choose another --out or pass --force")
        return None
    old = read_json(manifest_path)
    if force:
        return None
    if old.get("identity") != identity:
        changed = sorted(k for k in set(old.get("identity", {})) | set(identity)
                         if old.get("identity", {}).get(k) != identity.get(k))
        if "definitions_version" in changed:
            raise ProbeError(f"{run_dir} holds a run made by an older ggml-probe (definitions version "
                             f"{old.get('identity', {}).get('definitions_version')}, now {identity.get('definitions_version')}); "
                             "pass --force to redo it")
        if set(changed) <= set(BATCH_LAYOUT_KEYS):  # e.g. a run made with the API's old default of 1
            made, asked = (_batch_layout(i) for i in (old.get("identity", {}), identity))
            raise ProbeError(f"{run_dir} holds a run decoded with {made}, this one asks for {asked} (the batch layout "
                             "moves the logits): to continue it pass what it was made with, or --force to redo it")
        old_neurons, new_neurons = (i.get("neurons") for i in (old.get("identity", {}), identity))
        details = [] if not (old_neurons and new_neurons) else [  # which neuron setting, not just "neurons"
            f"neurons.{k} {old_neurons.get(k)}, now {new_neurons.get(k)}"
            for k in sorted(set(old_neurons) | set(new_neurons)) if old_neurons.get(k) != new_neurons.get(k)]
        named = [k for k in changed if k != "neurons" or not details] + details
        raise ProbeError(f"{run_dir} holds a run with different settings ({', '.join(named)}); pass the settings it was "
                         "made with to continue it, use another --out, or --force to redo it")
    if old.get("status") == "complete" and not resume:
        raise ProbeError(f"{run_dir} already holds a finished run; pass --resume to reuse it or --force to redo it")
    if old.get("status") != "complete" and not resume:
        raise ProbeError(f"{run_dir} holds an unfinished run; pass --resume to continue it or --force to start over")
    return old


# A run's batch layout in its identity (EvalConfig.identity): absent at one prompt per decode.
BATCH_LAYOUT_KEYS = ("batch_prompts", "share_prefix")


def _batch_layout(identity: dict[str, Any]) -> str:
    """How to ask for a run identity's batch layout: the CLI option and the EvalConfig/StudyConfig fields."""
    batch = identity.get("batch_prompts", 1)
    share = bool(identity.get("share_prefix")) if batch != 1 else True
    return (f"{batch} prompt(s) per decode (--batch {batch}; batch_prompts={batch}"
            + ("" if share else ", share_prefix=False") + ")")


def evaluate(
    model: str | Path,
    config: EvalConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: ProgressFn | None = None,
    quant_label: str | None = None,
) -> RunSummary:
    """Run one model on one task and write the run directory. Resumable chunk by chunk."""
    t_start = time.perf_counter()
    path = resolve_model(model)
    data = load_examples(task_spec(config), data_path=config.data_path, limit=config.limit,
                         on_bad_row=config.on_bad_row, seed=config.seed)
    if not data.examples:
        raise ProbeError(f"task {data.spec.name} has no examples to run")
    model_id = _model_identity(path)
    identity = {"model_sha256": model_id["sha256"], "data_sha256": data.data_sha256, **config.identity(),
                "definitions_version": DEFINITIONS_VERSION}
    identity = json.loads(json.dumps(identity))  # as it will read back from manifest.json (tuples → lists)
    run_dir = Path(run_dir)
    with directory_lock(run_dir):
        old = prepare_run_dir(run_dir, identity, resume, force)
        if old is None:
            for stale in ("chunks", NEURON_STATE, IMATRIX_STATE, "predictions.parquet", "logits.npy", "hidden.npy", "metrics.json",
                          "reliability.png", "neurons.json", "neuron_stats.npz"):
                p = run_dir / stale
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif old.get("status") == "complete":
            metrics = read_json(run_dir / "metrics.json")
            if config.imatrix_out and not Path(config.imatrix_out).exists():  # asked again after it was moved
                old["imatrix"] = _write_run_imatrix(run_dir, model_id, data, config, None)
                write_json(run_dir / MANIFEST, old)
            if progress:
                progress(len(data.examples), len(data.examples))
            return RunSummary(run_dir, str(path), model_id["file_type"], len(data.examples), metrics, 0.0,
                              resumed_examples=len(data.examples), manifest=old)

        probe = imatrix_probe = None
        if config.neurons:
            ns = config.neurons
            probe_class, finalize_pass = neuron_pass_for(path)  # dense FFN or mixture of experts
            probe = probe_class(path, ns.layers, ns.definitions, redundancy=ns.redundancy, top_k=ns.top_k,
                                allow_large=ns.allow_large, memory_budget_bytes=ns.redundancy_budget,
                                redundancy_full=ns.redundancy_full)
        if config.imatrix_out:
            imatrix_probe = imatrix_probe_for(path)  # refuses an architecture it cannot follow
        stateful = {NEURON_STATE: probe, IMATRIX_STATE: imatrix_probe}
        stateful = {folder: p for folder, p in stateful.items() if p is not None}
        _restore_probe_state(run_dir, stateful)
        # Every analysis rides the same decode: one callback hands each probe the tensors it asked for.
        all_probes = None
        if stateful:
            all_probes = ProbeSet(list(stateful.values()))
        engine = Engine(path, n_ctx=config.n_ctx, n_threads=config.threads, gpu_layers=config.gpu_layers,
                        n_seq_max=config.batch_prompts, flash_attn=config.flash_attn,
                        eval_callback=all_probes.eval_callback if all_probes else None)
        # The last layer's FFN is cut to the output rows unless every token is an output: the imatrix
        # (like llama-imatrix) counts every token, neuron statistics only need it when the last layer is analysed.
        all_outputs = imatrix_probe is not None or (probe is not None and engine.n_layer - 1 in probe.accumulator.layers)
        try:
            manifest = {
                "status": "running",
                "tool": {"ggml_probe": __version__, **versions(), "python": platform.python_version(),
                         "platform": platform.platform()},
                "identity": identity,
                "model": model_id,
                "quant": quant_label or model_id["file_type"],
                "task": data.describe(),
                "config": asdict(config),
                "engine": engine.info().to_dict(),
                "definitions": {"scoring": scoring.DEFINITIONS},
            }
            write_json(run_dir / MANIFEST, manifest)
            done = _finished_positions(run_dir)
            resumed = len(done)
            todo = [i for i in range(len(data.examples)) if i not in done]
            n_total = len(data.examples)
            if progress:
                progress(len(done), n_total)
            chunk_no = _next_chunk_number(run_dir)
            last_state = time.perf_counter()
            for start in range(0, len(todo), config.chunk_size):
                positions = todo[start : start + config.chunk_size]
                arrays = _run_chunk(engine, data.spec, [data.examples[i] for i in positions], data.labels, config,
                                    all_probes, positions[0], all_outputs)
                save_npz(run_dir / CHUNKS / f"{chunk_no:05d}.npz", positions=np.asarray(positions, dtype=np.int64), **arrays)
                if stateful and (start + config.chunk_size >= len(todo)
                                 or time.perf_counter() - last_state >= config.state_every_s):
                    for folder, p in stateful.items():
                        _save_probe_state(run_dir, p, chunk_no, folder)
                    last_state = time.perf_counter()
                chunk_no += 1
                if progress:
                    progress(resumed + start + len(positions), n_total)
            if probe is not None:
                manifest["neurons"] = finalize_pass(run_dir, probe.finish(), engine, config.neurons)
            if imatrix_probe is not None:
                manifest["imatrix"] = _write_run_imatrix(run_dir, model_id, data, config, imatrix_probe)
        finally:
            engine.close()

        summary = finalize_run(run_dir, data, manifest, config)
        summary.resumed_examples = resumed
        summary.seconds = time.perf_counter() - t_start
        return summary


def _write_run_imatrix(run_dir: Path, model_id: dict, data, config: EvalConfig, imatrix_probe) -> dict[str, Any]:
    """Write the run's imatrix to config.imatrix_out (from the probe, or from the last saved state)."""
    if imatrix_probe is None:  # a finished run asked for its imatrix again: rebuild it from the saved sums
        states = sorted((run_dir / IMATRIX_STATE).glob("*.npz"))
        if not states:
            raise ProbeError(f"{run_dir} kept no imatrix sums; rerun with --force")
        imatrix_probe = imatrix_probe_for(Path(model_id["path"]))
        imatrix_probe.restore(states[-1])
    imatrix_probe.check()
    if not imatrix_probe.sums:
        raise ProbeError("llama.cpp offered none of the matmul inputs; is this a llama-family model?")
    im = imatrix_probe.imatrix([data.source], len(data.examples))
    out = write_imatrix(Path(config.imatrix_out), im)
    return {"path": str(out.resolve()), "entries": len(im.entries), "prompts": len(data.examples),
            "tokens": imatrix_probe.tokens}


def _save_probe_state(run_dir: Path, probe, chunk_no: int, folder_name: str = NEURON_STATE) -> None:
    """The accumulator after chunk N; the state saved before it is kept, so a crash while writing costs
    the chunks since that one, not the run. The new state is written over an older one (a neuron state is
    n_ff² floats per layer and definition: fresh pages for it cost more than the writing)."""
    folder = run_dir / folder_name
    older = sorted((f for f in folder.glob("*.npz") if f.stem.isdigit() and int(f.stem) < chunk_no),
                   key=lambda f: int(f.stem))[:-1]
    save_npz(folder / f"{chunk_no:05d}.npz", reuse=older.pop(0) if older else None, **probe.state())
    for old in older:
        old.unlink()


def _restore_probe_state(run_dir: Path, probes: dict[str, Any]) -> None:
    """Continue every accumulator (folder name → probe) exactly where the finished chunks left it.

    The states written after the last chunk are used; if the run died between writing a chunk and
    its states, that chunk is dropped and recomputed, so no token is counted twice or missed.
    """
    if not probes:
        return
    chunk_nos = sorted(int(f.stem) for f in (run_dir / CHUNKS).glob("*.npz") if f.stem.isdigit())
    states = {folder: {int(f.stem): f for f in (run_dir / folder).glob("*.npz") if f.stem.isdigit()}
              for folder in probes}
    while chunk_nos and any(chunk_nos[-1] not in s for s in states.values()):
        (run_dir / CHUNKS / f"{chunk_nos.pop():05d}.npz").unlink()
    if chunk_nos:
        for folder, probe in probes.items():
            probe.restore(states[folder][chunk_nos[-1]])


def _finished_positions(run_dir: Path) -> set[int]:
    done: set[int] = set()
    for f in sorted((run_dir / CHUNKS).glob("*.npz")):
        try:
            with np.load(f) as z:
                done.update(int(i) for i in z["positions"])
        except Exception:
            f.unlink()  # an unreadable checkpoint (cannot happen with atomic writes, but never trust it)
    return done


def _next_chunk_number(run_dir: Path) -> int:
    names = [int(f.stem) for f in (run_dir / CHUNKS).glob("*.npz") if f.stem.isdigit()]
    return max(names, default=-1) + 1


def _fit_with_answers(engine, spec, example, labels: Sequence[str]):
    """An example's decoded tokens and its labels' answers (tasks.answers; a multiple-choice example's
    answers are its own choices). All but the last token of the longest answer is decoded after the
    prompt, so the prompt is fitted to leave room for it: no room at all when every answer is one token,
    as before answers of several tokens were scored."""
    labels, distinct = example.answer_words(labels), not example.choices
    answers = label_answers(engine, example.prompt, labels, distinct=distinct)
    longest = max(len(a.tokens) for a in answers)
    fitted = example_tokens(engine, spec, example, engine.prompt_limit - (longest - 1))
    if fitted.dropped:  # the answers follow the prompt as decoded
        answers = label_answers(engine, fitted.text, labels, fitted.tokens, distinct=distinct)
        longest = max(len(a.tokens) for a in answers)
        if len(fitted.tokens) + longest - 1 > engine.n_ctx:
            raise ProbeError(f"task {spec.name}: a prompt cut to fit the context leaves no room for an answer of "
                             f"{longest} tokens; raise --ctx")
    return fitted, answers


# How each example's labels were scored (chunks' label_mode, predictions' label_scoring).
TOKEN, LOGLIK = 0, 1
MODE_NAMES = {TOKEN: "token", LOGLIK: "loglik"}


def _run_chunk(engine, spec, examples, labels: Sequence[str], config: EvalConfig, probe=None,
               first_position: int = 0, all_outputs: bool = False) -> dict[str, np.ndarray]:
    pairs = [_fit_with_answers(engine, spec, ex, labels) for ex in examples]
    fitted = [f for f, _ in pairs]
    answers = [a for _, a in pairs]
    prompts = [f.tokens for f in fitted]
    share = config.share_prefix and config.batch_prompts > 1
    if probe is None:
        results = engine.run(prompts, share_prefix=share)
    else:
        probe.prompt_offset = first_position  # prompt indices in the neuron state are run positions
        results = run_checked(engine, probe, prompts, all_outputs=all_outputs, share_prefix=share)
    logits = np.stack([r.logits for r in results]).astype(np.float32)
    top = np.argmax(logits, axis=1)
    logp = scoring.log_softmax(logits)
    if any(r.truncated for r in results):  # cannot happen: the prompts were fitted to the engine's limit
        raise ProbeError("the engine cut a prompt the task had already fitted to the context")

    n, n_labels = len(examples), len(labels)
    lab = np.empty((n, n_labels), dtype=np.float64)
    loglik = np.empty((n, n_labels), dtype=np.float64)
    mode = np.full(n, TOKEN, dtype=np.int8)
    forms = np.full((n, n_labels, 2), -1, dtype=np.int32)
    by_forms: dict[tuple, list[int]] = {}
    for i, (toks, ans, ex) in enumerate(zip(prompts, answers, examples)):
        # A multiple-choice example is always scored by its choices' log-likelihoods (lm-evaluation-harness's
        # multiple_choice), never by merged single-token surface forms.
        sets = None if ex.choices else single_token_forms(ans, len(toks))
        if sets is None:
            mode[i] = LOGLIK
            continue
        by_forms.setdefault(sets, []).append(i)
        for j, (a, ids) in enumerate(zip(ans, sets)):
            forms[i, j, :len(ids)] = ids
            loglik[i, j] = logp[i, a.tokens[0]]
    # Every answer one token: the next-token logits of the main pass, each label's forms merged.
    for sets, rows in by_forms.items():
        lab[rows] = scoring.label_logits(logits[rows], scoring.LabelTokens(tuple(labels), sets))
    # Otherwise each answer's log-likelihood, its tokens decoded after the prompt (one extra prompt decode).
    for i in np.flatnonzero(mode == LOGLIK):
        ans = answers[i]
        if all(a.single and a.context == len(prompts[i]) for a in ans):  # one token each: the main pass has them
            loglik[i] = lab[i] = [logp[i, a.tokens[0]] for a in ans]
            continue
        k0 = min(a.context for a in ans)
        conts = [np.concatenate([prompts[i][k0:a.context], np.asarray(a.tokens, dtype=np.int32)]) for a in ans]
        rows = engine.continuation_logits(prompts[i][:k0], conts)
        for j, (a, r) in enumerate(zip(ans, rows)):
            loglik[i, j] = scoring.continuation_loglik(r[len(r) - len(a.tokens):], a.tokens)
        lab[i] = loglik[i]

    out = {
        "n_tokens": np.array([len(t) for t in prompts], dtype=np.int32),
        "tokens": pack_tokens(prompts),  # exactly what was decoded, for everything that points into it
        "truncated": np.array([f.dropped for f in fitted], dtype=np.int32),
        "label_logits": lab,
        "loglik": loglik,
        "label_mode": mode,
        "label_forms": forms,
        "answer_lengths": np.array([[len(a.tokens) for a in ans] for ans in answers], dtype=np.int32),
        "answer_context": np.array([[a.context for a in ans] for ans in answers], dtype=np.int32),
        "answer_tokens": np.array([t for ans in answers for a in ans for t in a.tokens], dtype=np.int32),
        "top_token": top.astype(np.int32),
        "top_logprob": logp[np.arange(len(top)), top],
        "entropy": -(np.exp(logp) * logp).sum(axis=1),
    }
    if results[0].hidden is not None:
        out["hidden"] = np.stack([r.hidden for r in results]).astype(np.float32)
    if config.save_logits:
        out["logits"] = logits.astype(np.float16)
    # Token pieces are needed for paper scoring; decode them now while the vocab is loaded.
    out["top_piece"] = np.array([engine.token_to_piece(int(t)) for t in top], dtype=object).astype(str)
    return out


def _load_chunks(run_dir: Path) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for f in sorted((run_dir / CHUNKS).glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
            parts.setdefault("answers", []).append(_answer_lists(z["answer_tokens"], z["answer_lengths"]))
    parts.pop("tokens", None)  # one ragged array per chunk, not a row per example: read with decoded_tokens
    parts.pop("answer_tokens", None)  # ragged too: split into "answers" above
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(merged["positions"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def _answer_lists(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A chunk's packed answer tokens as one entry per example: a tuple per label of its token ids."""
    cuts = np.cumsum(lengths.ravel())
    pieces = np.split(flat, cuts[:-1]) if len(cuts) else []
    out = np.empty(len(lengths), dtype=object)
    for i in range(len(lengths)):
        out[i] = tuple(tuple(int(t) for t in p) for p in pieces[i * lengths.shape[1]:(i + 1) * lengths.shape[1]])
    return out


def _answer_summary(model_path: str, labels: Sequence[str], answers: np.ndarray, forms: np.ndarray,
                    multiple_choice: bool = False) -> dict[str, Any]:
    """For the manifest: each label's answer tokens as they occurred (with their pieces and how many examples),
    and `label_tokens`, every token that stood for the label (single-token forms, first answer tokens). A
    multiple-choice run lists no answers (each example has its own; predictions.parquet keeps them)."""
    seen: dict[str, dict[tuple[int, ...], int]] = {w: {} for w in labels}
    for per_label in answers:
        for w, toks in zip(labels, per_label):
            seen[w][toks] = seen[w].get(toks, 0) + 1
    label_tokens = {}
    for j, w in enumerate(labels):
        ids = {int(t) for t in forms[:, j].ravel() if t >= 0} | {toks[0] for toks in seen[w]}
        label_tokens[w] = sorted(ids)
    if multiple_choice:
        return {"label_tokens": label_tokens, "answers": {}}
    with Vocab(model_path) as vocab:
        listed = {w: [{"tokens": list(toks), "pieces": [vocab.token_to_piece(t) for t in toks], "examples": count}
                      for toks, count in sorted(seen[w].items(), key=lambda kv: -kv[1])] for w in labels}
    return {"label_tokens": label_tokens, "answers": listed}


ACCURACY_NORM = ("accuracy_norm: lm-evaluation-harness's acc_norm, the fraction of examples whose argmax over labels of "
                 "answer log-likelihood / len(label) in characters is the gold label (a multiple-choice task: "
                 "len(choice), the example's own choice without the joining space)")


def finalize_run(run_dir: Path, data, manifest: dict, config: EvalConfig) -> RunSummary:
    """Merge checkpoints into the final tables, compute metrics, plot, mark the run complete."""
    import pandas as pd

    arrays = _load_chunks(run_dir)
    n = len(data.examples)
    if len(arrays["positions"]) != n or not np.array_equal(arrays["positions"], np.arange(n)):
        raise ProbeError(f"{run_dir}: checkpoints do not cover every example exactly once; rerun with --force")
    labels = list(data.labels)
    gold = np.array([ex.gold for ex in data.examples], dtype=np.int64)
    label_logp = scoring.log_softmax(arrays["label_logits"])
    label_p = np.exp(label_logp)
    pred = np.argmax(label_p, axis=1)
    conf = label_p[np.arange(n), pred]
    pieces = [str(p) for p in arrays["top_piece"]]
    multiple_choice = data.spec.multiple_choice
    if multiple_choice:  # no label words to find in the argmax token: does it start the gold choice's answer?
        paper_pred = scoring.mc_paper_prediction(arrays["top_token"], arrays["answers"])
        paper_ok = paper_pred == gold
    else:
        paper_pred = np.array([scoring.paper_prediction_index(p, tuple(labels)) for p in pieces], dtype=np.int64)
        paper_ok = np.array([scoring.paper_correct(p, labels[g]) for p, g in zip(pieces, gold)])
    paper_conf = np.exp(arrays["top_logprob"])
    pred_norm = scoring.norm_prediction(arrays["loglik"], [ex.choices for ex in data.examples] if multiple_choice
                                        else labels)

    table = {
        "position": np.arange(n),
        "id": [ex.id for ex in data.examples],
        "row": [ex.index for ex in data.examples],
        "gold": [labels[g] for g in gold],
        "gold_index": gold,
        "n_tokens": arrays["n_tokens"],
        "truncated_tokens": arrays["truncated"],
        "pred": [labels[p] for p in pred],
        "pred_index": pred,
        "confidence": conf,
        "correct": pred == gold,
        "paper_token": arrays["top_token"],
        "paper_piece": pieces,
        "paper_pred_index": paper_pred,
        "paper_confidence": paper_conf,
        "paper_correct": paper_ok,
        "entropy": arrays["entropy"],
        "label_scoring": [MODE_NAMES[int(m)] for m in arrays["label_mode"]],
        "pred_norm_index": pred_norm,
        "correct_norm": pred_norm == gold,
    }
    for j, w in enumerate(labels):
        table[f"p_{w}"] = label_p[:, j]
    if multiple_choice:  # the choices each example was scored on
        for j, w in enumerate(labels):
            table[f"choice_{w}"] = [ex.choices[j] for ex in data.examples]
    for j, w in enumerate(labels):
        table[f"loglik_{w}"] = arrays["loglik"][:, j]
        table[f"answer_{w}"] = [list(a[j]) for a in arrays["answers"]]
    df = pd.DataFrame(table)
    with atomic_output(run_dir / "predictions.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    if "logits" in arrays:
        save_npy(run_dir / "logits.npy", arrays["logits"])
    if "hidden" in arrays:
        save_npy(run_dir / "hidden.npy", arrays["hidden"])

    label_set = calibration_summary(label_p, gold, n_boot=config.n_boot)
    correct_norm = (pred_norm == gold).astype(np.float64)
    low = high = None
    if config.n_boot > 0:
        low, high = bootstrap_ci(accuracy, correct_norm, n_boot=config.n_boot, alpha=label_set["alpha"],
                                 seed=label_set["seed"])
    label_set["accuracy_norm"] = {"value": float(accuracy(correct_norm)), "ci_low": low, "ci_high": high}
    label_set["definitions"]["accuracy_norm"] = ACCURACY_NORM
    paper = calibration_summary(label_p, gold, pred_index=np.zeros(n, dtype=np.int64), confidence=paper_conf,
                                correct=paper_ok, n_boot=config.n_boot)
    for k in ("brier", "nll"):  # defined on the label distribution only; not part of the paper mode
        paper.pop(k)
        paper["definitions"].pop(k)
    paper["answered_with_a_label"] = float(np.mean(paper_pred >= 0))
    metrics = {
        "n": n,
        "label_set": label_set,
        "paper": paper,
        "truncated_examples": int(np.sum(arrays["truncated"] > 0)),
        "bad_rows": len(data.bad_rows),
        # examples whose labels were scored by next-token logits (every answer one token) or by log-likelihood
        "label_scoring": {name: int(np.sum(arrays["label_mode"] == m)) for m, name in MODE_NAMES.items()},
        "definitions": {"scoring": scoring.DEFINITIONS},
    }
    if multiple_choice:
        metrics["multiple_choice"] = data.spec.choices.count
    write_json(run_dir / "metrics.json", metrics)
    title = f"{manifest['quant']} · {data.spec.name}"
    plot_reliability({"label-set": reliability_bins(conf, pred == gold), "paper": reliability_bins(paper_conf, paper_ok)},
                     run_dir / "reliability.png", title=title)
    manifest.update(_answer_summary(manifest["model"]["path"], labels, arrays["answers"], arrays["label_forms"],
                                    multiple_choice))
    manifest["status"] = "complete"
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(run_dir / MANIFEST, manifest)
    return RunSummary(run_dir, manifest["model"]["path"], manifest["quant"], n, metrics, 0.0,
                      truncated_examples=metrics["truncated_examples"], bad_rows=len(data.bad_rows), manifest=manifest)


def ladder_files(model: str | Path, quants: Sequence[str], *, allow_requantize: bool = False,
                 out_dir: Path | None = None) -> dict[str, Path]:
    """The GGUF file of every requested level, building the missing ones (existing files are kept).

    A level equal to the source's own file type is the source itself.
    """
    src = resolve_model(model)
    levels = [normalize_quant(q) for q in quants]
    own = inspect_gguf(src).file_type
    files = {q: src for q in levels if q == own}
    to_build = [q for q in levels if q not in files]
    if to_build:
        for r in quantize_ladder(src, to_build, out_dir=out_dir, allow_requantize=allow_requantize, skip_existing=True):
            files[r.quant] = r.path
    return {q: files[q] for q in levels}


def run_dir_name(model_path: Path, task: str) -> str:
    return f"{ladder_stem(model_path)}-{Path(task).stem}"
