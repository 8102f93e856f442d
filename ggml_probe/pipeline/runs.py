"""One task on a model, or on every level of its quantization ladder: the eval pass of each level
(resumable), the comparison with the reference level, and the neuron part (dead, salient, redundant
neurons per level, and their comparison). `ggml-probe eval` and `neurons` call `run_levels`; the
study calls `run_level_files` once per task on the ladder it built.

    from ggml_probe.pipeline.evaluation import EvalConfig
    from ggml_probe.pipeline.neurons import NeuronAnalysis
    from ggml_probe.pipeline.runs import run_levels

    res = run_levels("demo", EvalConfig(task="yesno-mini", limit=20), ["F16", "Q4_0"], "runs/demo",
                     neurons=NeuronAnalysis(), resume=True)
    res.comparison["levels"]["Q4_0"]["agreement"], res.neurons["Q4_0"]["dead"]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

from ..models.store import DEMO_NAME, resolve_model
from ..tasks import load_examples
from .compare import compare_levels
from .evaluation import EvalConfig, NeuronSettings, ProgressFn, RunSummary, evaluate, ladder_files, run_dir_name, task_spec
from .neurons import NeuronAnalysis, compare_neuron_levels, neuron_level, neuron_targets
from .rundir import write_json


class RunProgress(Protocol):
    """What a caller shows while runs go: a bar per level (run) and a line per long step (attribution)."""

    def run(self, label: str) -> ProgressFn | None: ...
    def step(self, label: str) -> None: ...


@dataclass
class LevelRuns:
    """The runs of one task: per level its summary and GGUF file, the comparison with the reference
    level (two levels or more), and the neuron figures when the neuron part ran."""

    root: Path
    summaries: dict[str, RunSummary]  # by level; a single model's run: by its file type
    files: dict[str, Path]
    reference: str | None = None  # None: a single level, nothing compared
    comparison: dict[str, Any] | None = None
    neurons: dict[str, dict] | None = None
    neuron_comparison: dict[str, Any] | None = None
    imatrix: bool = False  # an imatrix was asked for (each run's manifest says where it went)

    @property
    def run_dirs(self) -> dict[str, Path]:
        return {level: s.run_dir for level, s in self.summaries.items()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON `eval --json` / `neurons --json` print."""
        runs = {level: {"run_dir": str(s.run_dir), "metrics": s.metrics,
                        **({"imatrix": s.manifest.get("imatrix")} if self.imatrix else {})}
                for level, s in self.summaries.items()}
        return {"runs": runs, "comparison": self.comparison, "neurons": self.neurons,
                "neuron_comparison": self.neuron_comparison}


def implied_requantize(model: str | Path, levels: Sequence[str] | None, allow_requantize: bool) -> bool:
    """Whether building these levels requantizes without having been allowed to: the demo model exists
    only as Q4_1, so its ladder is requantized by design (and the caller may say so)."""
    return bool(levels) and not allow_requantize and str(model) == DEMO_NAME


def run_levels(model: str | Path, eval_config: EvalConfig, levels: Sequence[str] | None = None,
               out: str | Path | None = None, *, reference: str | None = None, allow_requantize: bool = False,
               resume: bool = False, force: bool = False, neurons: NeuronAnalysis | None = None,
               imatrix_out: str | Path | None = None, progress: RunProgress | None = None) -> LevelRuns:
    """Run MODEL on eval_config's task: the model itself, or each of `levels` (its ladder, missing
    files built first, into OUT/<LEVEL>); compare the levels; run the neuron part when `neurons` is given.

    out: default runs/<model stem>-<task>. imatrix_out: also write an imatrix from each pass
    (with levels one per level, FILE-LEVEL). resume/force: per run directory, as in `evaluate`.
    """
    src = resolve_model(model)
    root = Path(out) if out is not None else Path("runs") / run_dir_name(src, eval_config.task)
    if levels:
        allow = allow_requantize or implied_requantize(model, levels, allow_requantize)
        files: dict[str | None, Path] = dict(ladder_files(src, levels, allow_requantize=allow))
    else:
        files = {None: src}
    return run_level_files(files, eval_config, root, reference=reference, resume=resume, force=force,
                           neurons=neurons, imatrix_out=imatrix_out, progress=progress)


def run_level_files(files: dict[str | None, Path], eval_config: EvalConfig, root: str | Path, *,
                    reference: str | None = None, resume: bool = False, force: bool = False,
                    neurons: NeuronAnalysis | None = None, imatrix_out: str | Path | None = None,
                    progress: RunProgress | None = None, salient_donors: tuple[Path, ...] = ()) -> LevelRuns:
    """The runs of GGUF files already at hand, by level (ROOT/<LEVEL>); the key None is one model's
    own run, in ROOT itself. See run_levels. salient_donors: run directories whose salient neurons are
    reused where made from the same file, tokens and settings (pipeline.neurons.neuron_level)."""
    root = Path(root)
    if neurons is not None:
        # The attribution and the ablation run with the engine settings of the pass they explain.
        neurons = replace(neurons, n_ctx=eval_config.n_ctx, threads=eval_config.threads,
                          gpu_layers=eval_config.gpu_layers)
        if eval_config.neurons is None:  # the pass captures what the neuron part analyses
            eval_config = replace(eval_config, neurons=NeuronSettings(layers=neurons.layers,
                                                                      definitions=(neurons.neuron,), tau=neurons.tau,
                                                                      redundancy=neurons.redundancy,
                                                                      redundancy_budget=neurons.redundancy_budget,
                                                                      redundancy_full=neurons.redundancy_full))
    summaries: dict[str, RunSummary] = {}
    paths: dict[str, Path] = {}
    for level, path in files.items():
        config = eval_config
        if imatrix_out:  # one imatrix per level: each level's own activations
            target = Path(imatrix_out)
            config = replace(eval_config, imatrix_out=str(
                target.with_name(f"{target.stem}-{level}{target.suffix}") if level else target))
        update = progress.run(f"{level or path.name} · {eval_config.task}") if progress else None
        summary = evaluate(path, config, root / level if level else root, resume=resume, force=force,
                           progress=update, quant_label=level)
        summaries[str(level or summary.quant)] = summary
        paths[str(level or summary.quant)] = path
    result = LevelRuns(root, summaries, paths, imatrix=bool(imatrix_out))
    if len(summaries) > 1:
        result.comparison = compare_levels(result.run_dirs, reference=reference, n_boot=eval_config.n_boot)
        result.reference = result.comparison["reference"]
        write_json(root / "comparison.json", result.comparison)
    if neurons is not None:
        examples = load_examples(task_spec(eval_config), data_path=eval_config.data_path, limit=eval_config.limit,
                                 on_bad_row=eval_config.on_bad_row, seed=eval_config.seed).examples
        prompts = [ex.prompt for ex in examples]
        result.neurons = {level: neuron_level(d, paths[level], prompts, neurons, progress,
                                              neuron_targets(d, examples, neurons), [ex.choices for ex in examples],
                                              salient_donors)
                          for level, d in result.run_dirs.items()}
        if result.reference is not None:
            result.neuron_comparison = compare_neuron_levels(result.run_dirs, result.reference, result.neurons)
    return result
