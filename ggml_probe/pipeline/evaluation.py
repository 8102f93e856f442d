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
from ..analysis.calibration import calibration_summary, plot_reliability, reliability_bins
from ..engine.ffn import model_ffn
from ..engine.imatrix_capture import ImatrixProbe, SUPPORTED
from ..engine.llama_lib import versions
from ..engine.model import Engine, offload_layers
from ..engine.probes import ProbeSet, run_checked
from ..errors import ProbeError, UnsupportedArchitecture
from ..formats.imatrix import write_imatrix
from ..fsutil import atomic_output, sha256_file
from ..models.ggufinfo import inspect_gguf
from ..models.quant_types import normalize_quant
from ..models.quantize import ladder_stem, quantize_ladder
from ..models.store import resolve_model
from ..tasks import get_task, load_examples, make_task
from .neuron_stats import NeuronProbe
from .neurons import finalize_neurons
from .rundir import directory_lock, read_json, save_npy, save_npz, write_json
from .tokens import CHUNKS, example_tokens, pack_tokens


MANIFEST = "manifest.json"
# 2: prompts longer than the context keep their template (BOS, instruction, the tail up to the answer)
# and lose the end of their longest field instead of their beginning; checkpoints store the tokens.
DEFINITIONS_VERSION = 2
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


@dataclass
class EvalConfig:
    task: str = "boolq"  # a task name, a path to a task TOML, or a name for a --template task
    data_path: str | None = None
    template: str | None = None  # a generic task: prompt template over the data's columns
    labels: tuple[str, ...] | None = None
    gold_column: str | None = None
    id_column: str | None = None
    limit: int | None = None
    seed: int | None = None
    on_bad_row: str = "fail"
    n_ctx: int = 2048
    threads: int | None = None
    gpu_layers: str | int = "auto"
    batch_prompts: int = 1  # sequences per llama_decode (1: results independent of batch layout)
    flash_attn: bool = False  # llama.cpp's flash attention (moves the logits on CPU; see engine.model)
    chunk_size: int = 32  # examples per checkpoint
    save_logits: bool = True
    n_boot: int = 1000
    neurons: NeuronSettings | None = None
    imatrix_out: str | None = None  # also write an imatrix (llama.cpp's format) from this pass's own inputs

    def identity(self) -> dict[str, Any]:
        """The settings that change results (a resumed run must match them).

        The decode's numerics are part of it: the batch layout, flash attention and GPU offload each
        move the logits (README, engine notes), so a run is never continued with other ones. Each
        joins only when it differs from the CPU defaults, so runs made before still resume.
        """
        out = {"task": self.task, "template": self.template, "labels": list(self.labels or []) or None,
               "gold_column": self.gold_column, "limit": self.limit,
               "neurons": asdict(self.neurons) if self.neurons else None, "seed": self.seed, "on_bad_row": self.on_bad_row,
               "n_ctx": self.n_ctx}
        if self.batch_prompts != 1:
            out["batch_prompts"] = self.batch_prompts
        if self.flash_attn:
            out["flash_attn"] = True
        gpu = offload_layers(self.gpu_layers)  # what llama.cpp will offload here: 0 without a GPU backend
        if gpu:
            out["gpu_layers"] = gpu
        if self.imatrix_out:  # only when asked, so runs made before the option still resume
            out["imatrix"] = True  # the sums must cover every example: resuming without it is refused
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
    """The task definition: a named/TOML task, or one built from --template/--labels/--gold-column."""
    if config.template is None:
        return get_task(config.task)
    if not config.labels or not config.gold_column:
        raise ProbeError("a --template task also needs --labels and --gold-column")
    if not config.data_path:
        raise ProbeError("a --template task needs --data FILE")
    return make_task(config.template, list(config.labels), config.gold_column, config.id_column,
                     name=config.task or "custom")


def label_tokens_for(engine, labels: Sequence[str]) -> scoring.LabelTokens:
    """First tokens of each label's surface forms ('W', ' W'); refuses labels that share a token."""
    ids = []
    for word in labels:
        forms = {int(engine.tokenize(form, add_special=False)[0]) for form in (word, " " + word)}
        ids.append(tuple(sorted(forms)))
    seen: dict[int, str] = {}
    for word, toks in zip(labels, ids):
        for t in toks:
            if t in seen:
                raise ProbeError(f"labels {seen[t]!r} and {word!r} start with the same token; choose distinct label words")
            seen[t] = word
    return scoring.LabelTokens(tuple(labels), tuple(ids))


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
        raise ProbeError(f"{run_dir} holds a run with different settings ({', '.join(changed)}); use another --out or --force")
    if old.get("status") == "complete" and not resume:
        raise ProbeError(f"{run_dir} already holds a finished run; pass --resume to reuse it or --force to redo it")
    if old.get("status") != "complete" and not resume:
        raise ProbeError(f"{run_dir} holds an unfinished run; pass --resume to continue it or --force to start over")
    return old


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
        raise ProbeError(f"task {config.task} has no examples to run")
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
            probe = NeuronProbe(path, ns.layers, ns.definitions, redundancy=ns.redundancy, top_k=ns.top_k,
                                allow_large=ns.allow_large)
        if config.imatrix_out:
            if model_id["architecture"] not in SUPPORTED:
                raise UnsupportedArchitecture(f"{model_id['architecture']}: --imatrix-out supports {', '.join(SUPPORTED)}")
            imatrix_probe = ImatrixProbe(_block_count(path))
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
            label_toks = label_tokens_for(engine, data.labels)
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
                "label_tokens": {w: list(t) for w, t in zip(label_toks.labels, label_toks.token_ids)},
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
            for start in range(0, len(todo), config.chunk_size):
                positions = todo[start : start + config.chunk_size]
                arrays = _run_chunk(engine, data.spec, [data.examples[i] for i in positions], label_toks, config,
                                    all_probes, positions[0], all_outputs)
                save_npz(run_dir / CHUNKS / f"{chunk_no:05d}.npz", positions=np.asarray(positions, dtype=np.int64), **arrays)
                for folder, p in stateful.items():
                    _save_probe_state(run_dir, p, chunk_no, folder)
                chunk_no += 1
                if progress:
                    progress(resumed + start + len(positions), n_total)
            if probe is not None:
                manifest["neurons"] = finalize_neurons(run_dir, probe.finish(), engine, config.neurons)
            if imatrix_probe is not None:
                manifest["imatrix"] = _write_run_imatrix(run_dir, model_id, data, config, imatrix_probe)
        finally:
            engine.close()

        summary = finalize_run(run_dir, data, label_toks, manifest, config)
        summary.resumed_examples = resumed
        summary.seconds = time.perf_counter() - t_start
        return summary


def _block_count(path: Path) -> int:
    return model_ffn(path).n_layer


def _write_run_imatrix(run_dir: Path, model_id: dict, data, config: EvalConfig, imatrix_probe) -> dict[str, Any]:
    """Write the run's imatrix to config.imatrix_out (from the probe, or from the last saved state)."""
    if imatrix_probe is None:  # a finished run asked for its imatrix again: rebuild it from the saved sums
        states = sorted((run_dir / IMATRIX_STATE).glob("*.npz"))
        if not states:
            raise ProbeError(f"{run_dir} kept no imatrix sums; rerun with --force")
        imatrix_probe = ImatrixProbe(_block_count(Path(model_id["path"])))
        imatrix_probe.restore(states[-1])
    imatrix_probe.check()
    if not imatrix_probe.sums:
        raise ProbeError("llama.cpp offered none of the matmul inputs; is this a llama-family model?")
    im = imatrix_probe.imatrix([data.source], len(data.examples))
    out = write_imatrix(Path(config.imatrix_out), im)
    return {"path": str(out.resolve()), "entries": len(im.entries), "prompts": len(data.examples),
            "tokens": int(max(imatrix_probe.counts.values()))}


def _save_probe_state(run_dir: Path, probe, chunk_no: int, folder_name: str = NEURON_STATE) -> None:
    """The accumulator after chunk N; the one before it is kept, so a crash between a chunk and its
    state costs one chunk of recomputation, not the run."""
    folder = run_dir / folder_name
    save_npz(folder / f"{chunk_no:05d}.npz", **probe.state())
    for old in folder.glob("*.npz"):
        if old.stem.isdigit() and int(old.stem) < chunk_no - 1:
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


def _run_chunk(engine, spec, examples, label_toks: scoring.LabelTokens, config: EvalConfig, probe=None,
               first_position: int = 0, all_outputs: bool = False) -> dict[str, np.ndarray]:
    fitted = [example_tokens(engine, spec, ex, engine.prompt_limit) for ex in examples]
    prompts = [f.tokens for f in fitted]
    if probe is None:
        results = engine.run(prompts)
    else:
        probe.prompt_offset = first_position  # prompt indices in the neuron state are run positions
        results = run_checked(engine, probe, prompts, all_outputs=all_outputs)
    logits = np.stack([r.logits for r in results]).astype(np.float32)
    lab = scoring.label_logits(logits, label_toks)
    top = np.argmax(logits, axis=1)
    logp = scoring.log_softmax(logits)
    if any(r.truncated for r in results):  # cannot happen: the prompts were fitted to the engine's limit
        raise ProbeError("the engine cut a prompt the task had already fitted to the context")
    out = {
        "n_tokens": np.array([len(t) for t in prompts], dtype=np.int32),
        "tokens": pack_tokens(prompts),  # exactly what was decoded, for everything that points into it
        "truncated": np.array([f.dropped for f in fitted], dtype=np.int32),
        "label_logits": lab.astype(np.float64),
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
    parts.pop("tokens", None)  # one ragged array per chunk, not a row per example: read with decoded_tokens
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(merged["positions"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def finalize_run(run_dir: Path, data, label_toks: scoring.LabelTokens, manifest: dict, config: EvalConfig) -> RunSummary:
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
    paper_pred = np.array([scoring.paper_prediction_index(p, tuple(labels)) for p in pieces], dtype=np.int64)
    paper_ok = np.array([scoring.paper_correct(p, labels[g]) for p, g in zip(pieces, gold)])
    paper_conf = np.exp(arrays["top_logprob"])

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
    }
    for j, w in enumerate(labels):
        table[f"p_{w}"] = label_p[:, j]
    df = pd.DataFrame(table)
    with atomic_output(run_dir / "predictions.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    if "logits" in arrays:
        save_npy(run_dir / "logits.npy", arrays["logits"])
    if "hidden" in arrays:
        save_npy(run_dir / "hidden.npy", arrays["hidden"])

    label_set = calibration_summary(label_p, gold, n_boot=config.n_boot)
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
        "definitions": {"scoring": scoring.DEFINITIONS},
    }
    write_json(run_dir / "metrics.json", metrics)
    title = f"{manifest['quant']} · {data.spec.name}"
    plot_reliability({"label-set": reliability_bins(conf, pred == gold), "paper": reliability_bins(paper_conf, paper_ok)},
                     run_dir / "reliability.png", title=title)
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
