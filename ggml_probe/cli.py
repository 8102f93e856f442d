"""The ggml-probe command line: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import ProbeError
from .fsutil import check_output, human_size
from .models.store import list_local_models, models_dir, resolve_model
from .pipeline import DEFAULT_BATCH_PROMPTS

# The rest is imported inside the commands that use it, so that `ggml-probe --help` and every command's
# start stay fast (0.04 s on 2 cores): rich (~30 ms), ggml_probe.tasks (~40 ms of tomllib, csv, socket,
# random, ...), models.fetch (~11 ms: it compiles its quant-name pattern) and whatever pulls numpy, gguf,
# pandas, scipy, matplotlib, llama_cpp, huggingface_hub or torch (the pipeline, models.quantize/convert/
# ggufinfo, weights, formats, engine, report).


def _console(stderr: bool = False):
    from rich.console import Console  # start-up time (see the imports)

    # Created per call so click's CliRunner (which swaps sys.stdout) captures the output.
    # Piped or captured output gets a wide page instead of rich's 80 columns, so tables stay whole.
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, width=width)


class ProbeGroup(click.Group):
    """Turns ProbeError into one line on stderr and exit code 2, Ctrl-C into exit 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ProbeError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted: finished work is kept; nothing half-written was left.", err=True)
            ctx.exit(130)


@click.group(cls=ProbeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ggml-probe")
def cli() -> None:
    """What did quantization do to my model?

    ggml-probe builds GGUF quantization ladders and measures, through llama.cpp, what each level
    changes: answers, confidence and calibration, hidden states, and FFN neurons.

    Anywhere a model is expected you can pass a GGUF path, a file name in the model store
    (./models or $GGML_PROBE_MODELS), or `demo` (SmolLM2-135M-Instruct, from `ggml-probe[demo]`).
    """


# --------------------------------------------------------------------------- models

@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.option("--no-hub-cache", is_flag=True, help="Do not scan the Hugging Face cache.")
def models_cmd(as_json: bool, no_hub_cache: bool) -> None:
    """List local models: the demo model, the model store and the Hugging Face cache."""
    found = list_local_models(include_hub_cache=not no_hub_cache)
    if as_json:
        click.echo(json.dumps([{"name": m.name, "path": str(m.path), "source": m.source, "size_bytes": m.size} for m in found], indent=2))
        return
    from rich.table import Table  # start-up time

    table = Table(title=f"Local models (store: {models_dir()})")
    for col in ("name", "source", "size", "path"):
        table.add_column(col)
    for m in found:
        table.add_row(m.name, m.source, human_size(m.size), str(m.path))
    console = _console()
    if found:
        console.print(table)
    else:
        console.print("No local models. Try `pip install 'ggml-probe[demo]'` or `ggml-probe fetch REPO_ID`.")


# --------------------------------------------------------------------------- inspect

@cli.command("inspect")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor (name, type, shape, size).")
def inspect_cmd(model: str, as_json: bool, show_tensors: bool) -> None:
    """Show what a GGUF file holds, read with gguf-py (no weights are loaded into llama.cpp)."""
    from .models.ggufinfo import inspect_gguf  # start-up time: gguf, numpy
    from .report.terminal import print_gguf_info  # start-up time: rich

    info = inspect_gguf(resolve_model(model))
    if as_json:
        click.echo(json.dumps(info.to_dict(with_tensors=show_tensors), indent=2, default=str))
        return

    print_gguf_info(_console(), info, show_tensors=show_tensors)


# --------------------------------------------------------------------------- quantize

@cli.command("quantize")
@click.argument("model")
@click.option("--to", "targets", multiple=True, required=True, metavar="QUANT",
              help="Target type, repeatable: F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_NL, Q3_K_M, Q2_K, ...")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write <stem>-<QUANT>.gguf files (default: the model store, ./models).")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Importance matrix (llama.cpp imatrix .gguf or legacy .dat); one made for another model is refused.")
@click.option("--allow-requantize", is_flag=True,
              help="Allow an already-quantized source (errors compound; the output's metadata records it).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--skip-existing", is_flag=True, help="Keep outputs that already exist instead of refusing.")
@click.option("--threads", type=int, default=0, show_default=True,
              help="Quantizer threads (0 = the cores this process may use, at most one per physical core).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="Tensors whose name the regex finds get this ggml type (Q4_K, Q6_K, Q8_0, F16, ...); repeatable, "
                   "the first match wins (llama-quantize's --tensor-type). A pattern that names no tensor is refused.")
@click.option("--output-tensor-type", default=None, metavar="TYPE", help="Type of output.weight.")
@click.option("--token-embedding-type", default=None, metavar="TYPE", help="Type of token_embd.weight.")
@click.option("--pure", is_flag=True, help="Every tensor at the target's main type (no k-quant mix rules).")
@click.option("--dry-run", is_flag=True, help="Write nothing: the types llama.cpp would choose and the file sizes.")
@click.option("--outfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (one --to only); default <stem>-<QUANT>.gguf, <stem>-<QUANT>-mix.gguf with type options.")
def quantize_cmd(model, targets, out_dir, imatrix, allow_requantize, force, skip_existing, threads, as_json,
                 tensor_types, output_tensor_type, token_embedding_type, pure, dry_run, outfile) -> None:
    """Build a quantization ladder with llama.cpp's own quantizer.

    Where a tensor's row length does not fit the type's block size (e.g. 576 columns and a 256-block
    k-quant), llama.cpp falls back to a type that fits; the fallbacks are reported.

    \b
    Example:
      ggml-probe quantize demo --allow-requantize --to F16 --to Q8_0 --to Q4_0 --to Q4_K_M
      ggml-probe quantize F16.gguf --to Q4_K_M --tensor-type 'blk\\.[0-2]\\.ffn_down=Q6_K' --dry-run
    """
    from .models.quantize import MixOptions, parse_tensor_type, quantize_ladder  # start-up time: gguf, numpy, llama_cpp
    from .report.terminal import print_ladder  # start-up time: rich

    console = _console(stderr=True)
    status = console.status("quantizing ...") if not as_json else None

    def on_start(quant: str, path: Path) -> None:
        if status is not None:
            status.update(f"quantizing to {quant} → {path}")

    if status is not None:
        status.start()
    try:
        mix = MixOptions([parse_tensor_type(t) for t in tensor_types], output_tensor_type, token_embedding_type, pure)
        results = quantize_ladder(model, targets, out_dir=out_dir, allow_requantize=allow_requantize,
                                  imatrix=imatrix, force=force, skip_existing=skip_existing,
                                  nthread=threads, on_start=on_start, mix=mix, dry_run=dry_run, out_file=outfile)
    finally:
        if status is not None:
            status.stop()
    if as_json:
        click.echo(json.dumps([
            {"quant": r.quant, "path": str(r.path), "seconds": round(r.seconds, 3), "size_bytes": r.info.size_bytes,
             "bits_per_weight": r.info.bits_per_weight, "tensor_types": r.info.tensor_types,
             "requantized_from": r.requantized_from, "skipped": r.skipped, "dry_run": r.dry_run,
             "fallbacks": {name: {"asked": a, "used": u} for name, (a, u) in r.fallbacks.items()}}
            for r in results], indent=2))
        return
    print_ladder(_console(), results)


# --------------------------------------------------------------------------- convert

@cli.command("convert")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]), default="f16", show_default=True,
              help="Type of the 2-D weights (1-D tensors stay f32).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output GGUF path (default: the model store, <folder>-<OUTTYPE>.gguf).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def convert_cmd(hf_dir: Path, outtype: str, out: Path | None, force: bool) -> None:
    """Convert a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json) to GGUF."""
    from .models.convert import convert_hf_to_gguf  # start-up time: gguf, numpy

    with _console(stderr=True).status(f"converting {hf_dir} ..."):
        path = convert_hf_to_gguf(hf_dir, out, outtype=outtype, force=force)
    _console().print(f"wrote {path} ({human_size(path.stat().st_size)})")


# --------------------------------------------------------------------------- fetch

@cli.command("fetch")
@click.argument("repo_id")
@click.option("--quant", "quants", multiple=True, metavar="QUANT", help="Quant level to download, repeatable.")
@click.option("--file", "filename", default=None, help="A file name in the repo (split files: the first shard).")
@click.option("--revision", default=None, help="Branch, tag or commit.")
def fetch_cmd(repo_id: str, quants: tuple[str, ...], filename: str | None, revision: str | None) -> None:
    """Download GGUF files from a Hugging Face model repo (into the Hugging Face cache).

    With no --quant or --file, lists the quant levels the repo offers. Honours HF_HOME,
    HF_HUB_CACHE and HF_HUB_OFFLINE.
    """
    from .models.fetch import fetch_gguf, list_repo_gguf  # start-up time: ~11 ms, huggingface_hub when called

    console = _console()
    if not quants and not filename:
        listing = list_repo_gguf(repo_id, revision=revision)
        files = listing.quants
        if listing.offline:
            console.print("[yellow]offline: showing the files in the local Hugging Face cache[/]")
        from rich.table import Table  # start-up time

        table = Table(title=f"GGUF files in {repo_id}")
        table.add_column("quant")
        table.add_column("files")
        table.add_column("size", justify="right")
        for quant, names in files.items():
            size = listing.total_size(quant)
            table.add_row(quant, "\n".join(names), human_size(size) if size else "")
        console.print(table)
        console.print(f"Download one with: ggml-probe fetch {repo_id} --quant QUANT")
        return
    paths = fetch_gguf(repo_id, quants=list(quants), filename=filename, revision=revision)
    for p in paths:
        console.print(str(p))


# --------------------------------------------------------------------------- eval

def _option_group(*options):
    """One decorator applying several click options in the order written (shared by eval, neurons, study)."""
    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply


_engine_options = _option_group(
    click.option("--ctx", "n_ctx", type=int, default=2048, show_default=True,
                 help="Context size; a longer prompt keeps its template (BOS, instruction, the text after the "
                      "fields) and its longest field is cut token-wise (counted in the results)."),
    click.option("--threads", type=int, default=None,
                 help="CPU threads (default: the cores this process may use, at most one per physical core)."),
    click.option("--gpu-layers", default="auto", show_default=True,
                 help="Layers to offload to CUDA/Metal: 'auto' (all, where a GPU backend exists), -1 (all) or N."),
    click.option("--batch", "batch_prompts", type=int, default=DEFAULT_BATCH_PROMPTS, show_default=True,
                 help="Prompts decoded together in one llama_decode (each in its own sequence; their common "
                      "prefix, e.g. the task's instruction, decoded once and its KV cache shared). Faster "
                      "(benchmarks/passes.md), but llama.cpp's CPU kernels make logits depend slightly on the "
                      "batch layout; 1 gives each prompt the same result as decoding it alone."),
)


_task_options = _option_group(
    click.option("--task", default="boolq", show_default=True,
                 help="Task name (boolq, boolq-passage, jigsaw, yesno-mini) or a task .toml file; with --template, "
                      "the generic task's own name (default: the data file's name)."),
    click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="Local data file (.jsonl, .json, .csv, .parquet) for the task."),
    click.option("--template", default=None, help="Generic task: prompt template over the data's columns, e.g. '{text}\\nAnswer:'."),
    click.option("--labels", default=None, help="Generic task: comma-separated label words, e.g. True,False."),
    click.option("--label-map", default=None,
                 help="Generic task: gold values → label words, e.g. 0=No,1=Yes (also gives the labels when --labels "
                      "is absent). Without it, integer gold labels (SST-2, GLUE: 0/1) map by position in --labels."),
    click.option("--gold-column", default=None, help="Generic task: the column holding the gold label."),
    click.option("--id-column", default=None, help="Generic task: the column holding example ids."),
    click.option("--choices-column", default=None,
                 help="Generic multiple-choice task: the column holding each example's list of choices (endings), or "
                      "comma-separated columns, one per choice (sol1,sol2); --gold-column holds the right choice's "
                      "0-based index and --labels may name the choices. Each choice is scored as the answer after the "
                      "prompt (acc, and acc_norm per character as lm-evaluation-harness)."),
    click.option("--limit", type=int, default=None, help="Use the first N valid examples."),
    click.option("--seed", type=int, default=None, help="With --limit: a seeded random sample instead of the first N."),
    click.option("--on-bad-row", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
                 help="What to do with malformed data rows (they are reported with their row numbers)."),
)


def _eval_config(task, data_path, template, labels, gold_column, id_column, limit, seed, on_bad_row,
                 n_ctx, threads, gpu_layers, batch_prompts, label_map=None, choices_column=None):
    from .pipeline.evaluation import EvalConfig  # start-up time: numpy, llama_cpp
    from .tasks.spec import parse_label_map  # start-up time: ggml_probe.tasks

    return EvalConfig(task=task, data_path=data_path, template=template,
                      labels=tuple(w.strip() for w in labels.split(",")) if labels else None,
                      gold_column=gold_column, id_column=id_column, limit=limit, seed=seed, on_bad_row=on_bad_row,
                      n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, batch_prompts=batch_prompts,
                      label_map=tuple(parse_label_map(label_map).items()) if label_map else None,
                      choices_columns=tuple(c.strip() for c in choices_column.split(",")) if choices_column else None)


_run_options = _option_group(
    click.option("--quants", default=None,
                 help="Comma-separated levels to run (e.g. F16,Q8_0,Q4_0); missing ladder files are built first."),
    click.option("--ref", "reference", default=None, help="Reference level for comparisons (default: highest precision)."),
    click.option("--allow-requantize", is_flag=True, help="Allow building the ladder from an already-quantized source."),
    click.option("-o", "--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Run directory (default: runs/<model>-<task>, with one subfolder per level for --quants)."),
    click.option("--resume", is_flag=True, help="Continue an interrupted run (finished examples are kept)."),
    click.option("--force", is_flag=True, help="Discard an existing run in the output directory and start over."),
)


_redundancy_budget_options = (
    click.option("--redundancy-budget", default=None, metavar="SIZE",
                 help="Memory the redundancy correlations may take (e.g. 1GiB; default 256 MiB). When every neuron "
                      "does not fit, an evenly spaced subset of each layer's neurons (every k-th) is correlated and "
                      "the results say so."),
    click.option("--redundancy-full", is_flag=True,
                 help="Correlate every neuron; refused in one line when that needs more than --redundancy-budget "
                      "(default: this machine's available memory)."),
)


def _redundancy_budget(text: str | None) -> int | None:
    from .analysis.pick import parse_size  # start-up time: numpy

    if text is None:
        return None
    try:
        return parse_size(text)
    except ProbeError as exc:
        raise ProbeError(str(exc).replace("--memory", "--redundancy-budget")) from None


_neuron_options = _option_group(
    click.option("--layers", default="0,14,-1", show_default=True,
                 help="Layers to capture: a list (negatives count from the end) or 'all'."),
    click.option("--neuron", type=click.Choice(["act", "down_in"]), default="act", show_default=True,
                 help="act = SiLU(gate) / GELU output (the paper's); down_in = the input of ffn_down."),
    click.option("--tau", type=float, default=0.1, show_default=True,
                 help="Dead: every value over every token within (−tau, tau)."),
    click.option("--salient-examples", type=int, default=20, show_default=True,
                 help="Prompts attributed to find salient neurons (0: none)."),
    click.option("--attribution", type=click.Choice(["exact", "ig", "dla", "none"]), default="exact", show_default=True,
                 help="Salient-neuron attribution. exact: the paper's integrated gradients, closed form, last layer "
                      "only, no torch. ig: the paper's integrated gradients for every analysed layer, in torch on the "
                      "GGUF's own dequantized weights (pip install 'ggml-probe[attribution]'), with a convergence "
                      "check per layer. dla: direct effect only (act × direct path to the answer), every layer, no "
                      "torch; NOT the paper's method."),
    click.option("--attribution-target", type=click.Choice(["label", "answer", "gold"]), default="label", show_default=True,
                 help="Whose log p the salient neurons explain. label: the label the model chose (label-set "
                      "scoring), as the token it emits for it after the prompt. answer: the full-vocabulary argmax "
                      "token (the paper's; on small models often no label). gold: the gold label's token."),
    click.option("--ablate-top", type=int, default=5, show_default=True,
                 help="Causal check of each attributed layer: switch its top-N salient candidates off inside "
                      "llama.cpp and report the change of log p(attributed target, see --attribution-target), "
                      "beside N random neurons (0: skip)."),
    click.option("--no-redundancy", is_flag=True,
                 help="Skip the redundant-pair correlations (n_ff² floats per layer: about 0.5 GiB per layer at "
                      "n_ff 8192, 1.5 GiB at 14336), the neuron pass's largest memory. Mixture-of-experts "
                      "models have none (no per-expert redundancy)."),
    *_redundancy_budget_options,
)


class _Progress:
    """One rich progress bar per run (examples/s and ETA); silent when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = None

    def __enter__(self):
        if not self.quiet:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,  # start-up time
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=_console(stderr=True), transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def tracker(self, label: str):
        if self.progress is None:
            return None
        task_id = self.progress.add_task(label, total=None, rate="")
        state = {"t0": time.perf_counter(), "first": None}

        def update(done: int, total: int) -> None:
            now = time.perf_counter()
            if state["first"] is None:
                state["first"] = (done, now)
            d0, t0 = state["first"]
            rate = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
            self.progress.update(task_id, completed=done, total=total, rate=f"{rate:.1f} ex/s" if rate else "")

        return update


class _RunProgress(_Progress):
    """Rich progress for eval/neurons: a bar per level, a line per long step without a bar of its own
    (attribution); silent when quiet."""

    def run(self, label: str):
        return self.tracker(label)

    def step(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]… {message}[/]")


@cli.command("eval")
@click.argument("model")
@_task_options
@_run_options
@_engine_options
@click.option("--neurons", "with_neurons", is_flag=True, help="Also run the neuron analyses in the same pass.")
@_neuron_options
@click.option("--imatrix-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write an imatrix (llama.cpp's GGUF format) from this pass's own matmul inputs; with "
                   "--quants one file per level, named FILE-LEVEL. Resumable with the run.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(**options):
    """Evaluate a model on a task: accuracy, confidence, calibration (ACE, ECE, Brier, NLL).

    Writes a run directory (manifest.json, predictions.parquet, metrics.json, reliability.png,
    logits and hidden states). With --quants, runs every level of the ladder and compares each to
    the reference level (agreement, flips, KL, top-1 agreement, hidden-state similarity).

    \b
    Examples:
      ggml-probe eval demo --task boolq --data ../shared/data/boolq_validation.jsonl --limit 100
      ggml-probe eval demo --quants F16,Q8_0,Q4_0 --task yesno-mini
    """
    _run_eval(**options)


@cli.command("neurons")
@click.argument("model")
@_task_options
@_run_options
@_engine_options
@_neuron_options
@click.option("--imatrix-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write an imatrix (llama.cpp's GGUF format) from this pass's own matmul inputs; with "
                   "--quants one file per level, named FILE-LEVEL. Resumable with the run.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def neurons_cmd(**options):
    """FFN neurons through llama.cpp: dead, salient, redundant, and what the strongest respond to.

    The same single pass also produces the output-level metrics of `eval` (one decode per example).
    Across a ladder (--quants) it prints the paper's side-by-side table: dead, salient and redundant
    neurons per level, with dead/salient overlap and activation drift against the reference.

    Salient neurons come from --attribution: by default the paper's integrated gradients for the
    last layer, exact and without torch; `ig` adds every analysed layer (torch) and flags layers whose
    50-step integral does not converge (its completeness error is reported per layer).

    On a mixture-of-experts model (Mixtral, Qwen3-MoE) every expert's neurons are counted over the tokens routed to
    it, with how often each expert was routed per layer; no salient neurons (one line says why).

    \b
    Examples:
      ggml-probe neurons demo --quants F16,Q4_0 --task boolq --data ../shared/data/boolq_validation.jsonl --limit 50
      ggml-probe neurons demo --task boolq --data ../shared/data/boolq_validation.jsonl --limit 20 --attribution ig
    """
    _run_eval(with_neurons=True, **options)


def _run_eval(model, task, data_path, template, labels, label_map, gold_column, id_column, choices_column, limit, seed,
              on_bad_row,
              quants, reference, allow_requantize, out, resume, force, n_ctx, threads, gpu_layers, batch_prompts,
              with_neurons, layers, neuron, tau, salient_examples, attribution, attribution_target, ablate_top,
              no_redundancy, redundancy_budget, redundancy_full, as_json, quiet, imatrix_out) -> None:
    """eval and neurons: the options arrive by name from click (neurons sets with_neurons)."""
    from .pipeline.neurons import NeuronAnalysis  # start-up time: the pipeline (numpy, llama_cpp, ...)
    from .pipeline.runs import implied_requantize, run_levels
    from .report.terminal import print_eval_summary, print_neuron_summary  # start-up time: rich

    config = _eval_config(task, data_path, template, labels, gold_column, id_column, limit, seed, on_bad_row,
                          n_ctx, threads, gpu_layers, batch_prompts, label_map, choices_column)
    analysis = NeuronAnalysis(layers=layers, neuron=neuron, tau=tau, salient_examples=salient_examples,
                              attribution=attribution, attribution_target=attribution_target,
                              ablate_top=ablate_top, redundancy=not no_redundancy,
                              redundancy_budget=_redundancy_budget(redundancy_budget),
                              redundancy_full=redundancy_full) if with_neurons else None
    levels = [q for q in quants.split(",") if q.strip()] if quants else None
    if implied_requantize(model, levels, allow_requantize) and not quiet and not as_json:
        _console(stderr=True).print("[yellow]demo: the ladder is requantized from Q4_1 (the only precision shipped)[/]")
    with _RunProgress(quiet or as_json) as bars:
        result = run_levels(model, config, levels, out, reference=reference, allow_requantize=allow_requantize,
                            resume=resume, force=force, neurons=analysis, imatrix_out=imatrix_out, progress=bars)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    print_eval_summary(_console(), result.summaries, result.comparison)
    for s in result.summaries.values():
        if imatrix_out and s.manifest.get("imatrix"):
            im = s.manifest["imatrix"]
            _console().print(f"imatrix: {im['path']} ({im['entries']} matrices, {im['prompts']} prompts, {im['tokens']} tokens)")
    if result.neurons:
        print_neuron_summary(_console(), result.neurons, result.neuron_comparison)


# --------------------------------------------------------------------------- weights / dump

@cli.command("weights")
@click.argument("model")
@click.option("--ref", "ref", required=True, help="The reference GGUF (e.g. the F16 rung of the ladder).")
@click.option("--layers", default=None, help="Layers: all, 0,14,-1 or 3-7 (default: all).")
@click.option("--tensors", default=None, help="Tensor patterns over short names: ffn_down,ffn_gate,attn_* (default: every matrix).")
@click.option("--top", "top_k", type=int, default=10, show_default=True, help="How many most-hurt layers/tensors/neurons to show.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON (per tensor, per neuron, per layer).")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="An imatrix of the reference model: adds the per-neuron sensitivity, each input channel's "
                   "error weighted by its E[x²] (implies --sensitivity). One made for another model is refused.")
@click.option("--sensitivity", is_flag=True,
              help="Add the static per-neuron sensitivity of the --layers' FFN neurons (predicted RMS change of "
                   "act and down_in from the weight error); unweighted (E[x²] = 1) without --imatrix.")
def weights_cmd(model, ref, layers, tensors, top_k, as_json, imatrix, sensitivity) -> None:
    """Quantization error of MODEL's weights against --ref, per tensor, per layer and per FFN neuron.

    Reads tensors one at a time from the memory-mapped files (ggml's own dequantizers): relative
    RMSE, max abs error, cosine and SQNR. A neuron is a row of ffn_gate/ffn_up and a column of ffn_down.
    With --sensitivity or --imatrix, also predicts how far each FFN neuron moves: sqrt(Σ δW² · E[x²])
    of its gate and up rows (JSON: "sensitivity").
    """
    from .weights import compare_weights, format_report  # start-up time: numpy, gguf
    from .weights.sensitivity import format_sensitivity, neuron_sensitivity

    status = None if as_json else _console(stderr=True).status("reading tensors ...")
    if status:
        status.start()
    sens = None
    try:
        if imatrix is not None or sensitivity:
            sens = neuron_sensitivity(model, ref, imatrix=imatrix, layers=layers)  # refuses a foreign imatrix first
        report = compare_weights(model, ref, layers=layers, tensors=tensors, top_k=top_k)
    finally:
        if status:
            status.stop()
    if as_json:
        if sens is None:
            click.echo(report.to_json(with_units=True))
        else:
            click.echo(json.dumps({**report.to_dict(with_units=True), "sensitivity": sens.to_dict(top_k=top_k)},
                                  allow_nan=False))
    else:
        click.echo(format_report(report, top_k=top_k))
        if sens is not None:
            click.echo("")
            click.echo(format_sensitivity(sens, top_k=top_k))


@cli.command("dump")
@click.argument("model")
@click.option("--tensor", "names", multiple=True, required=True, help="Tensor name, repeatable (e.g. blk.14.ffn_down.weight).")
@click.option("--dequantize", is_flag=True, help="Write float32 values instead of the raw quantized blocks.")
@click.option("-o", "--out", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output file: .npy (one tensor) or .safetensors.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def dump_cmd(model, names, dequantize, output, force) -> None:
    """Export tensors of a GGUF file (raw blocks or dequantized) for other tools."""
    from .weights import dump_tensors  # start-up time: numpy, gguf

    res = dump_tensors(model, list(names), output, dequantize=dequantize, force=force)
    _console().print(f"wrote {res.path} ({human_size(res.n_bytes)})" + (f", metadata in {res.sidecar}" if res.sidecar else ""))


# --------------------------------------------------------------------------- kld

@cli.command("kld")
@click.argument("models", nargs=-1, required=True)
@click.option("--ref", "ref", default=None, help="The reference model (e.g. the F16 rung); not needed with --base.")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A plain-text file to score (e.g. wiki.test.raw); needs at least 2 × --ctx tokens.")
@click.option("--base", "base_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A reference made by `llama-perplexity --kl-divergence-base` (or by this command): its tokens, "
                   "ctx and log-probabilities are used, and --ref/--text are not needed.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk (llama-perplexity's -c).")
@click.option("--chunks", type=int, default=None, help="Score at most this many chunks (default: the whole text).")
@click.option("--batch", type=int, default=2048, show_default=True,
              help="Tokens per llama_decode (llama-perplexity's -b): batch/ctx chunks decode together.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use).")
@click.option("--gpu-layers", default="auto", show_default=True,
              help="Layers to offload to CUDA/Metal: 'auto' (all, where a GPU backend exists), -1 (all) or N.")
@click.option("--flash-attn", is_flag=True,
              help="Flash attention on (llama-perplexity's CPU default; off here, as everywhere in ggml-probe).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/kld"),
              show_default=True, help="Where the reference base, partial state and kld.json go (reused by later runs).")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON, one object per model.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def kld_cmd(models, ref, text_file, base_file, ctx, chunks, batch, threads, gpu_layers, flash_attn, out, as_json,
            quiet) -> None:
    """llama-perplexity's quality figures of MODELS against --ref, computed in-process.

    Exactly `llama-perplexity --kl-divergence`'s protocol and statistics: the text in chunks of --ctx
    tokens (BOS as llama.cpp adds it), the second half of each chunk scored; PPL and ln(PPL(Q)/PPL(base))
    with covariance-aware uncertainties, mean KLD ± its uncertainty and its percentiles, RMS Δp and
    "same top p". The reference's log-probabilities are computed once (in llama-perplexity's base
    format, readable by it) and reused; an interrupted run resumes by chunk.
    """
    from .pipeline.kld import KLDSettings, run_kld  # start-up time: numpy, llama_cpp
    from .report.terminal import print_kld_summary

    paths = {}
    for m in models:
        p = resolve_model(m)
        paths[p.stem if p.stem not in paths else str(p)] = p
    settings = KLDSettings(ctx=ctx, chunks=chunks, batch=batch, threads=threads, gpu_layers=gpu_layers,
                           flash_attn=flash_attn)
    text = None
    if base_file is None:
        if ref is None or text_file is None:
            raise ProbeError("kld needs --ref REF and --text FILE, or --base FILE from llama-perplexity")
        text = text_file.read_text(encoding="utf-8", errors="replace")
    with _Progress(quiet or as_json) as bars:
        trackers: dict[str, object] = {}

        def progress(done: int, total: int, label: str) -> None:
            if bars.progress is None:
                return
            if label not in trackers:
                trackers[label] = bars.tracker(f"{label} · chunks")
            trackers[label](done, total)

        result = run_kld(paths, resolve_model(ref) if ref else None, text, out, settings, base_file=base_file,
                         progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_kld_summary(_console(), result.to_dict())


# --------------------------------------------------------------------------- mix

@cli.command("mix")
@click.argument("model")
@click.option("--ref", "ref", required=True, help="The reference for the text KLD (e.g. the F16 file).")
@click.option("--type", "low_type", default="Q4_K", show_default=True,
              help="The low ggml type at which each tensor group's sensitivity is measured.")
@click.option("--budget-of", default=None, metavar="QUANT", help="Size budget: the stock file of this type (Q4_K_M).")
@click.option("--bpw", type=float, default=None, help="Size budget in bits per weight (tensor data / parameters).")
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Plain text for the KLD (sensitivity and the final comparison); at least 2 × --ctx tokens.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The mix's GGUF file.")
@click.option("--imatrix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Importance matrix: weighs the static estimate by E[x²] and is used by the quantizer.")
@click.option("--per-layer-kinds", type=int, default=1, show_default=True,
              help="How many of the most sensitive kinds (per byte) are measured layer by layer.")
@click.option("--ctx", type=int, default=256, show_default=True, help="Tokens per KLD chunk.")
@click.option("--chunks", type=int, default=8, show_default=True, help="KLD chunks scored (each probe scores them).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Probe cache, stock file and mix.json (default: OUT's folder, <stem>.mix-work).")
@click.option("--candidates", default=None, metavar="TYPES",
              help="Comma-separated types a tensor may get (default: Q2_K,Q3_K,Q4_0,IQ4_NL,Q4_1,Q4_K,Q5_0,Q5_1,Q5_K,Q6_K,Q8_0).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use).")
@click.option("--force", is_flag=True, help="Overwrite an existing OUT.")
@click.option("--json", "as_json", is_flag=True, help='Print {"mix": {...}, "stock": {...}} with sizes and KLD.')
def mix_cmd(model, ref, low_type, budget_of, bpw, text_file, out, imatrix, per_layer_kinds, ctx, chunks, work_dir,
            candidates, threads, force, as_json) -> None:
    """Choose per-tensor types under a size budget from measured sensitivity, write the file, and compare
    its text KLD with the stock file of the same budget.

    Each tensor group's sensitivity is the text KLD with only that group at --type and the rest at F16
    (per kind over all layers, then per layer for the most sensitive kinds); other types are scaled by
    the static error Σ δW²·E[x²]. More bits go where KLD saved per byte is highest.

    \b
      ggml-probe mix models/m-F16.gguf --ref models/m-F16.gguf --type Q4_K --budget-of Q4_K_M \\
          --text boolq.txt -o models/m-mix.gguf --json
    """
    from .pipeline.kld import KLDSettings  # start-up time: numpy, llama_cpp
    from .pipeline.mix import CANDIDATE_TYPES, run_mix

    text = text_file.read_text(encoding="utf-8", errors="replace")
    console = _console(stderr=True)
    status = console.status("mix ...") if not as_json else None
    if status is not None:
        status.start()
    try:
        result = run_mix(resolve_model(model), resolve_model(ref), text, low_type, out, budget_of=budget_of, bpw=bpw,
                         work_dir=work_dir, imatrix=imatrix, per_layer_kinds=per_layer_kinds,
                         candidates=tuple(t.strip().upper() for t in candidates.split(",")) if candidates else CANDIDATE_TYPES,
                         settings=KLDSettings(ctx=ctx, chunks=chunks, threads=threads), force=force,
                         progress=(lambda msg: status.update(f"mix: {msg}")) if status is not None else None)
    finally:
        if status is not None:
            status.stop()
    keys = ("path", "size_bytes", "bits_per_weight", "kld_mean", "kld_mean_se", "same_top_p", "ppl_ratio")
    if as_json:
        click.echo(json.dumps({"budget_bytes": result.budget_bytes, "budget": result.budget,
                               "mix": {k: result.mix.get(k) for k in (*keys, "predicted_kld", "tensor_types")},
                               "stock": {k: result.stock.get(k) for k in ("quant", *keys, "tensor_types")},
                               "spearman_static_vs_measured": result.sensitivity.get("spearman_all")}, indent=2))
        return
    out_console = _console()
    for label, fig in (("mix", result.mix), (f"stock {result.stock.get('quant') or '(none fits)'}", result.stock)):
        if fig.get("size_bytes") is None:
            out_console.print(f"{label}: no stock type fits {result.budget}")
            continue
        out_console.print(f"{label}: {fig['path']} · {human_size(fig['size_bytes'])} ({fig['size_bytes']} bytes, "
                          f"{fig['bits_per_weight']:.2f} bpw) · KLD {fig['kld_mean']:.5f} ±{fig['kld_mean_se']:.5f}"
                          f" · same top p {100 * fig['same_top_p']:.2f}%")
    rho = result.sensitivity.get("spearman_all")
    out_console.print(f"budget {result.budget} = {result.budget_bytes} bytes; static estimate vs measured KLD over "
                      f"the measured groups: Spearman {'—' if rho is None else f'{rho:.2f}'}")


# --------------------------------------------------------------------------- bench

@cli.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--quants", default=None,
              help="Comma-separated levels (e.g. F16,Q8_0,Q4_0): each MODEL's ladder, missing files built first.")
@click.option("--allow-requantize", is_flag=True, help="Allow building the ladder from an already-quantized source.")
@click.option("-p", "--n-prompt", default="512", show_default=True,
              help="Prompt tokens of the pp test (llama-bench -p); a list (128,512) runs a test of each; 0 skips it.")
@click.option("-n", "--n-gen", default="128", show_default=True,
              help="Generated tokens of the tg test (llama-bench -n); a list (32,128) runs a test of each; 0 skips it.")
@click.option("-r", "--reps", type=int, default=5, show_default=True, help="Repetitions of each test (llama-bench -r).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: the cores this process may use).")
@click.option("--gpu-layers", default="auto", show_default=True,
              help="Layers to offload to CUDA/Metal: 'auto' (all, where a GPU backend exists), -1 (all) or N.")
@click.option("-b", "--batch", type=int, default=2048, show_default=True, help="Logical batch (llama-bench -b).")
@click.option("--ubatch", type=int, default=512, show_default=True, help="Physical batch (llama-bench -ub).")
@click.option("--flash-attn", is_flag=True,
              help="Flash attention on (llama-bench's CPU default; off here, as everywhere in ggml-probe).")
@click.option("--no-warmup", is_flag=True, help="Skip the warm-up run before each test (llama-bench --no-warmup).")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON, one object per level.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def bench_cmd(models, quants, allow_requantize, n_prompt, n_gen, reps, threads, gpu_layers, batch, ubatch, flash_attn,
              no_warmup, as_json, quiet) -> None:
    """Prompt-processing and generation speed of MODELS (or each level of --quants), as llama-bench
    measures them, and the memory each level needs.

    ppN: N random tokens decoded at once from an empty cache; tgN: N tokens decoded one at a time with
    the KV cache kept. Each test: a warm-up run, then -r timed repetitions; tokens/s as the mean ± sample
    sd of the repetitions' rates. Memory: the weights, KV cache and compute buffers llama.cpp allocates,
    the process's peak RSS, and VRAM with --gpu-layers on a GPU build. Bits per weight from the file.

    \b
      ggml-probe bench demo --quants F16,Q8_0,Q4_0 -p 512 -n 128 -r 5
      ggml-probe bench models/a-Q4_K_M.gguf models/a-Q8_0.gguf --threads 8 --json
    """
    from .models.quant_types import normalize_quant  # start-up time: gguf
    from .pipeline.runs import implied_requantize  # start-up time: the pipeline (numpy, llama_cpp)
    from .pipeline.speed import BenchSettings, bench_models
    from .report.terminal import print_bench_summary  # start-up time: rich

    levels = [normalize_quant(q) for q in quants.split(",") if q.strip()] if quants else None  # bad name: one line
    settings = BenchSettings(n_prompt=_token_counts(n_prompt, "-p"), n_gen=_token_counts(n_gen, "-n"), reps=reps, threads=threads, gpu_layers=gpu_layers,
                             batch=batch, ubatch=ubatch, flash_attn=flash_attn, warmup=not no_warmup)
    if any(implied_requantize(m, levels, allow_requantize) for m in models) and not quiet and not as_json:
        _console(stderr=True).print("[yellow]demo: the ladder is requantized from Q4_1 (the only precision shipped)[/]")
    with _Progress(quiet or as_json) as bars:
        tasks: dict[str, object] = {}

        def progress(label: str, done: int, total: int) -> None:
            if bars.progress is None:
                return
            if label not in tasks:
                tasks[label] = bars.progress.add_task(f"{label} · runs", total=total, rate="")
            bars.progress.update(tasks[label], completed=done, total=total)

        result = bench_models(models, levels, settings, allow_requantize=allow_requantize, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_bench_summary(_console(), result.to_dict())


def _token_counts(value: str, flag: str) -> int | tuple[int, ...]:
    """llama-bench's -p/-n: one count (512) or a comma list (128,512)."""
    try:
        counts = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ProbeError(f"{flag} takes token counts like 512 or 128,512, not {value!r}") from None
    return counts[0] if len(counts) == 1 else counts


# --------------------------------------------------------------------------- pick

@cli.command("pick")
@click.argument("model")
@click.option("--quants", default="F16,Q8_0,Q4_K_M,Q4_0", show_default=True,
              help="Comma-separated ladder levels; the highest precision is the reference.")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A plain-text file for the KLD (e.g. wiki.test.raw).")
@click.option("--task", default=None, help="A task: its own text for the KLD when no --text (BoolQ: its passages), "
                                           "and its accuracy at every level with --max-accuracy-drop.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The task's data file (default: the Hugging Face hub).")
@click.option("--limit", type=int, default=100, show_default=True, help="Task examples for the accuracy runs.")
@click.option("--max-kld", type=float, default=0.1, show_default=True,
              help="Budget: mean KLD (nats) against the reference. On llama.cpp's LLaMA 3 8B scoreboard Q4_K_M is "
                   "0.03, Q3_K_M 0.10, Q2_K 0.45.")
@click.option("--max-p99-kld", type=float, default=None, help="Budget: 99th percentile of the per-token KLD.")
@click.option("--max-accuracy-drop", type=float, default=None,
              help="Budget: accuracy points lost against the reference on --task (runs the task at every level).")
@click.option("--memory", default=None, metavar="SIZE",
              help="Memory budget: 8GiB, 16GB, 512MiB... (default: this machine's available memory). A level "
                   "needs its file plus the KV cache and compute buffers at --run-ctx.")
@click.option("--run-ctx", type=int, default=4096, show_default=True,
              help="The context you plan to run with (its KV cache counts in each level's memory need).")
@click.option("--prefer", type=click.Choice(["size", "speed"]), default="size", show_default=True,
              help="Among the levels within the budget: the smallest file, or the fastest (needs --speed).")
@click.option("--speed", "measure_speed", is_flag=True,
              help="Also measure each level's speed as `bench` does (pp512, tg128, 5 repetitions): off by default.")
@click.option("--ctx", type=int, default=512, show_default=True, help="KLD: tokens per chunk (llama-perplexity's -c).")
@click.option("--chunks", type=int, default=32, show_default=True, help="KLD: at most this many chunks (0: the whole text).")
@click.option("--batch", type=int, default=2048, show_default=True, help="KLD: tokens per llama_decode.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use).")
@click.option("--gpu-layers", default="auto", show_default=True,
              help="Layers to offload to CUDA/Metal: 'auto' (all, where a GPU backend exists), -1 (all) or N.")
@click.option("--allow-requantize", is_flag=True, help="Allow a ladder from an already-quantized source (implied for demo).")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the KLD base and scores, the task runs and pick.json go (default: runs/pick/<model>); reused.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure and the pick as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def pick_cmd(model, quants, text_file, task, data_path, limit, max_kld, max_p99_kld, max_accuracy_drop, memory,
             run_ctx, prefer, measure_speed, ctx, chunks, batch, threads, gpu_layers, allow_requantize, out, as_json,
             quiet) -> None:
    """Which level should I run? The ladder's Pareto frontier and the pick within a budget.

    Every level's KLD against the highest-precision one (llama-perplexity's statistics, on --text or the
    task's own text), its size and bits per weight, its memory need at --run-ctx; the frontier over size ×
    mean KLD (× accuracy, speed where measured); the smallest (or fastest) level within the quality budget
    that fits the memory budget, and why. When no level fits, the answer says so and names the nearest
    miss (exit code 0: it is an answer, not an error).

    \b
    Examples:
      ggml-probe pick demo --quants F16,Q8_0,Q4_K_M,Q4_0 --task boolq --data ../shared/data/boolq_validation.jsonl
      ggml-probe pick model-F16.gguf --quants F16,Q6_K,Q4_K_M,Q3_K_M --text wiki.test.raw --memory 8GiB --max-kld 0.05
    """
    from .analysis.pick import Budget, parse_size  # start-up time: numpy
    from .pipeline.evaluation import EvalConfig  # start-up time: the pipeline (numpy, llama_cpp, ...)
    from .pipeline.kld import KLDSettings
    from .pipeline.pick import pick_levels
    from .report.terminal import print_pick_summary  # start-up time: rich

    budget = Budget(max_kld=max_kld, max_p99_kld=max_p99_kld, max_accuracy_drop=max_accuracy_drop,
                    memory_bytes=parse_size(memory) if memory is not None else None)
    eval_config = (EvalConfig(task=task, data_path=data_path, limit=limit, threads=threads, gpu_layers=gpu_layers)
                   if task and max_accuracy_drop is not None else None)
    text = text_file.read_text(encoding="utf-8", errors="replace") if text_file else None
    settings = KLDSettings(ctx=ctx, chunks=chunks or None, batch=batch, threads=threads, gpu_layers=gpu_layers)
    with _RunProgress(quiet or as_json) as bars:
        trackers: dict[str, object] = {}

        def track(label: str, done: int, total: int) -> None:
            if bars.progress is None:
                return
            if label not in trackers:
                trackers[label] = bars.tracker(label)
            trackers[label](done, total)

        def progress(done: int, total: int, label: str) -> None:
            track(f"{label} · KLD chunks", done, total)

        if measure_speed:
            from .pipeline.speed import BenchSettings, bench_files  # start-up time (and used only with --speed)

            bench = BenchSettings(threads=threads, gpu_layers=gpu_layers)
            speed_source = f"bench pp{bench.n_prompt}/tg{bench.n_gen}, {bench.reps} repetitions (llama-bench's protocol)"

            def speed_measure(files):
                return bench_files(files, bench, lambda label, done, total: track(f"{label} · speed", done, total)).speed()
        else:
            speed_measure = speed_source = None

        result = pick_levels(model, [q for q in quants.split(",") if q.strip()], text=text, text_file=text_file,
                             task=task, data_path=data_path, budget=budget, prefer=prefer, out=out,
                             kld_settings=settings, run_ctx=run_ctx, allow_requantize=allow_requantize,
                             eval_config=eval_config, measure_speed=speed_measure, speed_source=speed_source,
                             progress=progress, eval_progress=bars)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_pick_summary(_console(), result.to_dict())


# --------------------------------------------------------------------------- trace

@cli.command("trace")
@click.argument("model")
@click.option("--ref", "ref", required=True, help="The reference model (e.g. the F16 rung of the ladder).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A plain-text file to trace (at least --ctx tokens).")
@click.option("--task", default=None, help="Trace a task's own text instead (BoolQ: its passages).")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The task's data file (default: the Hugging Face hub).")
@click.option("--limit", type=int, default=100, show_default=True, help="Task rows whose text is read (with --task).")
@click.option("--ctx", type=int, default=256, show_default=True, help="Tokens per chunk (one decode, a fresh sequence).")
@click.option("--tokens", type=int, default=1024, show_default=True,
              help="Trace at most this many tokens of the text (whole chunks).")
@click.option("--layers", default=None,
              help="Blocks to compare and to patch for the KL: all, 0,14,-1 or 3-7 (default: all).")
@click.option("--no-kl", "no_kl", is_flag=True,
              help="Skip the KL attribution (it costs one more reference decode per chosen block and chunk).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use).")
@click.option("--gpu-layers", default="auto", show_default=True,
              help="Layers to offload to CUDA/Metal: 'auto' (all, where a GPU backend exists), -1 (all) or N.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def trace_cmd(model, ref, text_file, task, data_path, limit, ctx, tokens, layers, no_kl, threads, gpu_layers, as_json,
              quiet) -> None:
    """Where does MODEL's quantization error enter, and where does it grow? (against --ref)

    The same tokens go through both models, chunk by chunk. Per block: the relative error ‖q−r‖/‖r‖ and
    the cosine of the attention output (kqv_out: before attn_output; attn_out: after), the FFN output
    (ffn_out) and the residual stream after the block (l_out) against the reference's tensors. And how
    much each block adds to the final KL: the reference model is run with its residual stream after
    block k replaced by MODEL's, which is the KL with the embedding and blocks ≤ k quantized; the steps
    from block to block add up to MODEL's own KL.

    \b
    Examples:
      ggml-probe trace models/SmolLM2-135M-Instruct-Q4_0.gguf --ref models/SmolLM2-135M-Instruct-F16.gguf --text wiki.test.raw
      ggml-probe trace m-Q4_K_M.gguf --ref m-F16.gguf --task boolq --data ../shared/data/boolq_validation.jsonl --layers 0-7
    """
    from .pipeline.pick import task_text  # start-up time: the pipeline (numpy, llama_cpp, ...)
    from .pipeline.trace import TraceSettings, run_trace
    from .report.trace import print_trace_summary  # start-up time: rich

    if (text_file is None) == (task is None):
        raise ProbeError("trace needs a text: --text FILE, or --task TASK [--data FILE] (its own text), not both")
    text = (text_file.read_text(encoding="utf-8", errors="replace") if text_file
            else task_text(task, data_path, limit=limit)[0])
    settings = TraceSettings(ctx=ctx, tokens=tokens, layers=layers, kl=not no_kl, threads=threads, gpu_layers=gpu_layers)
    with _Progress(quiet or as_json) as bars:
        trackers: list = []

        def progress(done: int, total: int) -> None:
            if not trackers:  # the bar starts with the first chunk: bad input gets its one line alone
                trackers.append(bars.tracker(f"{Path(model).name} · chunks"))
            if trackers[0]:
                trackers[0](done, total)

        result = run_trace(resolve_model(model), resolve_model(ref), text, settings, progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        print_trace_summary(_console(), result)


# --------------------------------------------------------------------------- study

class _StudyProgress(_RunProgress):
    """Rich progress for a study: a line per step and a bar per (level, task) run."""

    def step(self, label: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]· {label}[/]")


@cli.command("study")
@click.argument("model")
@click.option("--quants", default="F16,Q8_0,Q4_K_M,Q4_0", show_default=True, help="Comma-separated ladder levels.")
@click.option("--task", "tasks", multiple=True, help="Task, repeatable (default: boolq; offline without data: the built-in yesno-mini).")
@click.option("--data", "data", multiple=True, metavar="[TASK=]PATH",
              help="Local data for a task, repeatable: TASK=PATH, or PATH alone for the only/first task.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="A folder searched for each task's data (<task>*.jsonl|parquet|csv), e.g. ../shared/data.")
@click.option("--limit", type=int, default=100, show_default=True, help="Examples per task.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the --limit sample (data files are often sorted by label); -1 takes the first N.")
@click.option("--layers", default="0,14,-1", show_default=True, help="Layers for the neuron analyses: 0,14,-1 / all / a list.")
@click.option("--paper", is_flag=True, help="The reference study's exact protocol (Singh & Sajjad 2025).")
@click.option("--ref", "reference", default=None, help="Reference level (default: highest precision).")
@click.option("--no-neurons", is_flag=True, help="Skip the neuron analyses.")
@click.option("--salient-examples", type=int, default=10, show_default=True,
              help="Prompts attributed per level to find salient neurons (0: none).")
@click.option("--attribution", type=click.Choice(["exact", "ig", "dla", "none"]), default=None,
              help="Salient-neuron attribution (see `ggml-probe neurons --help`); default exact, or ig with --paper "
                   "when torch is installed.")
@click.option("--attribution-target", type=click.Choice(["label", "answer", "gold"]), default=None,
              help="Whose log p the salient neurons explain: label (the label the model chose, as the token it emits "
                   "for it after the prompt), answer (the full-vocabulary argmax, the paper's) or gold; default "
                   "label, or answer with --paper.")
@click.option("--ablate-top", type=int, default=5, show_default=True,
              help="Causal check: switch each attributed layer's top-N salient candidates off and report the change "
                   "of log p(attributed target, see --attribution-target), beside N random neurons (0: skip).")
@click.option("--no-redundancy", is_flag=True,
              help="Skip the redundant-pair correlations (n_ff² floats per layer), the neuron part's largest memory. "
                   "Mixture-of-experts models have none (no per-expert redundancy).")
@_option_group(*_redundancy_budget_options)
@click.option("--no-weights", is_flag=True, help="Skip the weight-error analysis.")
@click.option("--kld-text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A plain-text file for the text KLD (llama-perplexity's statistics); default: the tasks' own text.")
@click.option("--kld-ctx", type=int, default=256, show_default=True, help="Tokens per chunk of the text KLD.")
@click.option("--kld-chunks", type=int, default=8, show_default=True, help="At most this many chunks (0: all).")
@click.option("--no-kld", is_flag=True, help="Skip the text KLD.")
@click.option("--trace-tokens", type=int, default=128, show_default=True,
              help="Tokens of the text KLD's text traced per level for 'where the error enters' (`trace`; 0: skip).")
@click.option("--max-kld", type=float, default=0.1, show_default=True,
              help="The pick's budget: mean text KLD against the reference.")
@click.option("--max-p99-kld", type=float, default=None, help="The pick's budget: p99 text KLD.")
@click.option("--max-accuracy-drop", type=float, default=None,
              help="The pick's budget: accuracy drop in points on any task.")
@click.option("--memory", "memory", default=None,
              help="The pick's memory budget (e.g. 8GiB; default: this machine's available memory).")
@click.option("--allow-requantize", is_flag=True, help="Allow a ladder from an already-quantized source (implied for demo).")
@click.option("--no-noise-floor", is_flag=True,
              help="Skip the noise floor (the reference run again with prompts packed per decode, flash attention "
                   "switched and another thread count, to tell quantization effects from decode noise).")
@click.option("--no-speed", is_flag=True, help="Skip the speed table (bench's pp/tg tokens/s and memory per level).")
@click.option("--speed", "speed_spec", default="128,32,2", show_default=True, metavar="PP,TG,REPS",
              help="The speed table's prompt tokens, generated tokens and repetitions (bench -p, -n, -r).")
@click.option("-o", "--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Study directory (default: studies/<model>).")
@click.option("--force", is_flag=True, help="Recompute finished levels instead of reusing them.")
@_engine_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display (for scripts).")
def study_cmd(model, quants, tasks, data, data_dir, limit, seed, layers, paper, reference, no_neurons, salient_examples,
              attribution, attribution_target, ablate_top, no_weights, kld_text, kld_ctx, kld_chunks, no_kld,
              max_kld, max_p99_kld, max_accuracy_drop, memory, allow_requantize, out, force, n_ctx, threads, gpu_layers, batch_prompts, as_json, quiet,
              trace_tokens, no_redundancy, no_noise_floor, no_speed, speed_spec, redundancy_budget,
              redundancy_full) -> None:
    """The whole study: ladder, one pass per level and task, comparisons, weights, and a report.

    Resumable: rerun the same command after an interruption and finished levels are reused.
    Writes STUDY_DIR/report.html (self-contained) and report.md.

    \b
    Example:
      ggml-probe study demo --quants F16,Q8_0,Q4_K_M,Q4_0 --task boolq --task jigsaw --data-dir ../shared/data --limit 50
    """
    from .models.quantize import ladder_stem  # start-up time: gguf, numpy
    from .analysis.pick import parse_size  # start-up time: numpy
    from .pipeline.study import StudyConfig, run_study  # start-up time: the whole pipeline
    from .report.terminal import print_study_summary  # start-up time: rich

    tasks = list(tasks) or ["boolq"]
    data_map: dict[str, str] = {}
    for i, item in enumerate(data):
        task, sep, path = item.partition("=")
        if not sep:
            if i >= len(tasks):
                raise ProbeError(f"--data {item}: more data files than tasks; use TASK=PATH")
            task, path = tasks[i], item
        if task not in tasks:
            raise ProbeError(f"--data {item}: {task} is not one of the tasks ({', '.join(tasks)})")
        if not Path(path).is_file():
            raise ProbeError(f"--data {item}: {path} does not exist")
        data_map[task] = path
    config = StudyConfig(quants=[q.strip() for q in quants.split(",") if q.strip()], tasks=tasks, data=data_map,
                         data_dir=data_dir, limit=limit, seed=None if seed == -1 else seed, layers=layers, paper=paper, reference=reference,
                         neurons=not no_neurons, salient_examples=salient_examples, attribution=attribution,
                         attribution_target=attribution_target, ablate_top=ablate_top, weights=not no_weights,
                         kld=not no_kld, kld_text=kld_text, kld_ctx=kld_ctx, kld_chunks=kld_chunks or None,
                         max_kld=max_kld, max_p99_kld=max_p99_kld, max_accuracy_drop=max_accuracy_drop,
                         memory_bytes=parse_size(memory) if memory is not None else None,
                         allow_requantize=allow_requantize,
                         n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers, batch_prompts=batch_prompts)
    config.trace, config.trace_tokens = trace_tokens > 0, max(trace_tokens, 1)
    config.redundancy, config.noise_floor, config.speed = not no_redundancy, not no_noise_floor, not no_speed
    config.redundancy_budget, config.redundancy_full = _redundancy_budget(redundancy_budget), redundancy_full
    speed_parts = speed_spec.split(",")
    if len(speed_parts) != 3 or not all(x.strip().isdigit() for x in speed_parts):
        raise ProbeError(f"--speed {speed_spec}: give PP,TG,REPS as three whole numbers, e.g. 128,32,2")
    config.speed_prompt, config.speed_gen, config.speed_reps = (int(x) for x in speed_parts)
    out = out or Path("studies") / ladder_stem(resolve_model(model))
    command = "ggml-probe " + " ".join(sys.argv[1:]) if sys.argv else ""
    with _StudyProgress(quiet or as_json) as bars:
        study = run_study(model, config, out, force=force, progress=bars, command=command)
    if as_json:
        click.echo(json.dumps(study_summary_json(study), indent=2, default=str))
        return
    print_study_summary(_console(), study, out)


def study_summary_json(study: dict) -> dict:
    """The headline figures per task and level (the whole thing is in study.json)."""
    out = {"study": {k: study["study"][k] for k in ("model", "quants", "reference", "tasks", "mode", "seconds")},
           "notes": study["study"].get("notes", []),
           "what_changed": study.get("what_changed", []), "tasks": {},
           "kld": {level: {k: m.get(k) for k in ("kld_mean", "kld_p99", "same_top_p", "ppl_ratio", "rms_dp")}
                   for level, m in ((study.get("kld") or {}).get("models") or {}).items()},
           "pick": ((study.get("pick") or {}).get("result") or {}).get("pick"),
           "noise_floor": {task: t.get("floor") for task, t in ((study.get("noise_floor") or {}).get("tasks") or {}).items()},
           "speed": {level: {k: d.get(k) for k in ("pp_tokens_per_s", "pp_tokens_per_s_sd", "tg_tokens_per_s",
                                                     "tg_tokens_per_s_sd")}
                     for level, d in ((study.get("speed") or {}).get("levels") or {}).items()},
           "pick_reasons": ((study.get("pick") or {}).get("result") or {}).get("reasons", [])}
    for task, t in study["tasks"].items():
        rows = {}
        for level, run in t["runs"].items():
            ls = run["metrics"]["label_set"]
            rows[level] = {k: ls[k]["value"] for k in ("accuracy", "mean_confidence", "ace_paper", "ece", "brier", "nll")}
            rows[level]["paper_accuracy"] = run["metrics"]["paper"]["accuracy"]["value"]
            c = (t.get("comparison") or {}).get("levels", {}).get(level)
            if c:
                rows[level].update(agreement=c["agreement"], kl_full=c.get("kl_full_mean"), flips=c["flips"]["changed"])
            n = (t.get("neurons") or {}).get(level)
            if n:
                rows[level].update(dead=n.get("dead"), salient=n.get("salient"), redundant_pairs=n.get("redundant_pairs"))
        out["tasks"][task] = {"data": t["data"].get("source"), "fallback_from": t["data"].get("fallback_from"), "levels": rows}
    return out


# --------------------------------------------------------------------------- sweep

@cli.command("sweep")
@click.argument("spec", metavar="SWEEP.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sweep directory (default: sweeps/<SWEEP.toml's stem>). On Ray: a folder every node sees.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run each cell as a Ray task (pip install 'ggml-probe[ray]'): --ray alone starts a local instance, "
                   "--ray HOST:PORT joins a cluster (`ray start --head` prints the address). Put it after SWEEP.toml.")
@click.option("--cpus-per-cell", type=click.IntRange(min=1), default=None,
              help="CPUs per cell, and llama.cpp's thread count in it (Ray default: 1; sequential: llama.cpp's default).")
@click.option("--gpus-per-cell", type=click.FloatRange(min=0), default=0, show_default=True,
              help="GPUs per cell on Ray; a cell with a GPU offloads every layer.")
@click.option("--force", is_flag=True, help="Accept a SWEEP.toml other than the one the directory was made by, "
                                            "redoing the cells whose settings changed.")
@click.option("--json", "as_json", is_flag=True, help="Print every cell's figures (and each model's pick) as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def sweep_cmd(spec, out, ray_address, cpus_per_cell, gpus_per_cell, force, as_json, quiet) -> None:
    """A grid of models × quant levels × tasks and texts, one after another or on Ray, with a merged report.

    SWEEP.toml names the models, the levels, the tasks, texts for the text KLD and any study option;
    each cell is one study run directory (SWEEP_DIR/<model>/runs/<task>/<LEVEL>), each model gets its
    study (SWEEP_DIR/<model>/report.html), and SWEEP_DIR/report.html merges the grid. Rerunning
    reuses every finished cell.

    \b
    Example SWEEP.toml:
      models = ["demo"]
      quants = ["F16", "Q4_0"]
      tasks = ["boolq"]
      limit = 12
      allow_requantize = true
      [data]
      boolq = "../shared/data/boolq_validation.jsonl"
    """
    from .pipeline.sweep import SequentialExecutor, load_spec, run_sweep  # start-up time: the whole pipeline

    sweep_spec = load_spec(spec)
    out = out or Path("sweeps") / spec.stem
    command = "ggml-probe " + " ".join(sys.argv[1:]) if sys.argv else ""

    def step(label: str) -> None:
        if not (quiet or as_json):
            click.echo(f"· {label}", err=True)

    def on_done(cell, outcome) -> None:
        if not (quiet or as_json):
            note = outcome.get("error") or f"{outcome.get('seconds') or 0:.1f} s"
            click.echo(f"  {outcome['status']:<8} {cell.key} · {note}", err=True)

    if ray_address is not None:
        from .pipeline.sweep_ray import RayExecutor  # start-up time; needs the [ray] extra

        with RayExecutor(ray_address or None, cpus_per_cell=cpus_per_cell or 1, gpus_per_cell=gpus_per_cell) as ex:
            result = run_sweep(sweep_spec, out, ex, force=force, on_done=on_done, step=step, command=command)
    else:
        ex = SequentialExecutor(threads=cpus_per_cell, gpu_layers=-1 if gpus_per_cell > 0 else None)
        result = run_sweep(sweep_spec, out, ex, force=force, on_done=on_done, step=step, command=command)
    if as_json:
        click.echo(json.dumps({"cells": [{k: c.get(k) for k in ("model", "level", "task", "text", "status", "error",
                                                                "figures", "seconds")} for c in result["cells"]],
                               "models": {m: {k: s.get(k) for k in ("pick", "reasons", "reference", "error", "dir")}
                                          for m, s in result["models"].items()},
                               "report": str(Path(out) / "report.html")}, indent=2, default=str))
        return
    failed = [c for c in result["cells"] if c["status"] == "failed"]
    for m, s in result["models"].items():
        click.echo(f"{m}: " + (f"not merged ({s['error']})" if s.get("error") else
                               f"pick {s.get('pick') or 'none fits'} · {s['dir']}/report.html"))
    click.echo(f"{len(result['cells'])} cells, {len(failed)} failed · {result['seconds']:.0f} s · "
               f"report: {Path(out) / 'report.html'} · every figure: {Path(out) / 'sweep.json'}")


# --------------------------------------------------------------------------- imatrix

@cli.group("imatrix")
def imatrix_group() -> None:
    """llama.cpp importance matrices: collect one from a task's prompts, or show one."""


@imatrix_group.command("collect")
@click.argument("model")
@_task_options
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output imatrix file (llama.cpp's GGUF format; llama-quantize and `ggml-probe quantize --imatrix` read it).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@_engine_options
def imatrix_collect_cmd(model, task, data_path, template, labels, label_map, gold_column, id_column, choices_column,
                        limit, seed, on_bad_row, out, force, n_ctx, threads, gpu_layers, batch_prompts) -> None:
    """Collect Σx² per input channel of every layer's matmuls on the task's prompts (llama-imatrix's rule),
    each prompt fitted to --ctx as eval fits it (the template kept, the longest field cut)."""
    from .formats.imatrix import write_imatrix  # start-up time: numpy
    from .pipeline.imatrix import collect_task_imatrix  # start-up time: llama_cpp, numpy, the pipeline

    check_output(out, force)
    config = _eval_config(task, data_path, template, labels, gold_column, id_column, limit, seed, on_bad_row,
                          n_ctx, threads, gpu_layers, batch_prompts, label_map, choices_column)
    with _Progress(False) as bars:
        im, _ = collect_task_imatrix(resolve_model(model), config, progress=bars.tracker(f"imatrix · {config.task}"))
    write_imatrix(out, im)
    _console().print(f"wrote {out}: {len(im.entries)} matrices, {im.chunk_count} prompts")


@imatrix_group.command("show")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the per-matrix statistics as JSON.")
def imatrix_show_cmd(path: Path, as_json: bool) -> None:
    """Per-layer statistics of an imatrix file (GGUF format or legacy .dat).

    An expert stack (ffn_*_exps of Mixtral or Qwen3-MoE) is one entry with a row per expert: `experts` says how many
    counted tokens, `tokens` is the sum over its experts (a token routed to k experts counts k times), and
    the mean and max of x² are over the experts that counted something.
    """
    from rich.table import Table  # start-up time

    from .formats.imatrix import read_imatrix  # start-up time: numpy

    im = read_imatrix(path)
    rows = im.summary()
    if as_json:
        click.echo(json.dumps({"datasets": im.datasets, "chunk_count": im.chunk_count, "legacy": im.legacy,
                               "entries": rows}, indent=2))
        return
    table = Table(title=f"{path.name} · {len(rows)} matrices · chunks {im.chunk_count} · data: {', '.join(im.datasets) or '—'}")
    for col in ("matrix", "experts", "channels", "tokens", "mean of x²", "max of x²", "max/mean"):
        table.add_column(col, justify="left" if col == "matrix" else "right")

    def number(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    for r in rows:
        experts = "" if r["matrices"] == 1 else f"{r['matrices_counted']}/{r['matrices']}"
        table.add_row(r["name"], experts, str(r["channels"]), f"{r['count']:.0f}", number(r["mean"], ".4g"),
                      number(r["max"], ".4g"), number(r["max_over_mean"], ".1f"))
    _console().print(table)


def main() -> None:
    cli(prog_name="ggml-probe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
