"""The noise floor of a study: the reference level run again under changes that carry no quantization,
each compared with the reference's own run by the same comparison a quantization level gets.

Perturbations (PERTURBATIONS): the batch layout (prompts packed several per decode, or one per decode when
the study packs them), flash attention switched, another thread count. Each is one more eval pass of the
reference on the same examples, a resumable run directory like every level's:

    STUDY/noise_floor/<task>/<perturbation>/<REF>/   the perturbed pass (and its neuron part)
    STUDY/noise_floor/<task>/batch/<LEVEL>/          every other level under the other batch layout
    STUDY/noise_floor/kld.json                       the text KLD of the reference under each perturbation

A quantized level can be far more sensitive to the batch layout than the reference: llama.cpp's CPU
kernels for quantized weights quantize the activations too (Q8_0 blocks of 32, or Q8_K), differently per
batch shape, so on the demo model's Q8_0 the layout alone moved the answer distribution by KL 4e-3 on
average against F16's 8e-6 (benchmarks/layout_noise.md). So every level is also run under the other batch layout and compared with its
own run (`levels`); a change is judged against the larger of the reference's floor and its own level's.

The neuron part of a perturbed pass keeps dead and salient neurons (salient only with the exact
attribution, a closed form on the last layer: cheap; ig and dla would add a torch pass per prompt) and skips the redundancy correlations and the ablation check: the floor compares
neither, and they are the neuron part's largest fixed costs. The text KLD scores the reference file
against the study's own base (the reference's log-probabilities at the study's settings) with the
perturbed settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..analysis.noise_floor import DEFINITIONS, effects, noise_floor, text_kld_effects
from ..engine.llama_lib import default_threads
from ..errors import ProbeError
from .compare import compare_runs
from .evaluation import EvalConfig
from .kld import KLDSettings, score_model
from .neurons import NeuronAnalysis
from .rundir import read_json, write_json
from .runs import RunProgress, run_level_files

PACKED_PROMPTS = 4  # the batch layout compared with one prompt per decode


@dataclass(frozen=True)
class Perturbation:
    """A change that carries no quantization: how it changes an eval pass and a text-KLD pass, and how a
    sentence names it ("2 flips between batch layouts of F16")."""

    phrase: str
    eval_config: Callable[[EvalConfig], EvalConfig]
    kld_settings: Callable[[KLDSettings], KLDSettings]
    describe: Callable[[EvalConfig], str]


def _other_threads(threads: int | None) -> int:
    n = threads or default_threads()
    return 1 if n > 1 else 2


PERTURBATIONS: dict[str, Perturbation] = {
    "batch": Perturbation(
        "between batch layouts",
        lambda c: replace(c, batch_prompts=PACKED_PROMPTS if c.batch_prompts == 1 else 1),
        # several chunks per decode, or one
        lambda s: replace(s, batch=s.ctx if s.batch > s.ctx else PACKED_PROMPTS * s.ctx),
        lambda c: f"{PACKED_PROMPTS if c.batch_prompts == 1 else 1} prompt(s) per decode vs {c.batch_prompts}"),
    "flash_attn": Perturbation(
        "with flash attention on and off",
        lambda c: replace(c, flash_attn=not c.flash_attn),
        lambda s: replace(s, flash_attn=not s.flash_attn),
        lambda c: f"flash attention {'off' if c.flash_attn else 'on'} vs {'on' if c.flash_attn else 'off'}"),
    "threads": Perturbation(
        "between thread counts",
        lambda c: replace(c, threads=_other_threads(c.threads)),
        lambda s: replace(s, threads=_other_threads(s.threads)),
        lambda c: f"{_other_threads(c.threads)} thread(s) vs {c.threads or default_threads()}"),
}


def _dir_name(name: str, config: EvalConfig) -> str:
    """A perturbation's folder; the thread count joins the name because it is not part of a run's identity."""
    return f"threads-{config.threads}" if name == "threads" else name


def task_floor(reference: str, ref_path: Path, ref_run_dir: Path, eval_config: EvalConfig, out: Path, *,
               ref_neurons: dict[str, Any] | None = None, neurons: NeuronAnalysis | None = None,
               perturbations: list[str] | None = None, levels: dict[str, tuple[Path, Path]] | None = None,
               force: bool = False, progress: RunProgress | None = None) -> dict[str, Any]:
    """The reference's perturbed passes on one task (resumable), each compared with its own run, and the
    floor: per metric the largest effect over the perturbations. `levels`: the other levels' (file, run
    directory), each run under the other batch layout too (level_layout_noise)."""
    names = perturbations or list(PERTURBATIONS)
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise ProbeError(f"unknown noise-floor perturbation {', '.join(unknown)}; known: {', '.join(PERTURBATIONS)}")
    # the floor compares dead and salient sets: no ablation check, no redundancy correlations
    light = replace(neurons, ablate_top=0, redundancy=False) if neurons is not None else None
    if light is not None and light.attribution != "exact":  # ig/dla cost a torch pass per prompt and layer
        light = replace(light, salient_examples=0)  # the floor keeps dead sets; salient ones only when cheap
    runs, settings, by_name = {}, {}, {}
    for name in names:
        p = PERTURBATIONS[name]
        config = p.eval_config(eval_config)
        if progress:
            progress.step(f"noise floor · {eval_config.task} · {reference} with {p.describe(eval_config)}")
        # the attribution's passes do not use the pass's batch layout or flash attention: where the targets and
        # the settings it uses are the reference run's, its salient neurons are taken from there
        result = run_level_files({reference: ref_path}, config, out / _dir_name(name, config), resume=not force,
                                 force=force, neurons=light, progress=progress, salient_donors=(ref_run_dir,))
        run_dir = result.run_dirs[reference]
        comparison = compare_runs(ref_run_dir, run_dir, n_boot=eval_config.n_boot)
        level_neurons = (result.neurons or {}).get(reference)
        runs[name] = str(run_dir)
        settings[name] = p.describe(eval_config)
        by_name[name] = effects(comparison, ref_neurons, level_neurons)
    section = {"runs": runs, "settings": settings, "effects": by_name, "floor": noise_floor(by_name)}
    if levels:
        section["levels"] = level_layout_noise(levels, eval_config, out, force=force, progress=progress)
    return section


def level_layout_noise(levels: dict[str, tuple[Path, Path]], eval_config: EvalConfig, out: Path, *,
                       force: bool = False, progress: RunProgress | None = None) -> dict[str, Any]:
    """Each level (file, its run directory) run again under the other batch layout, without the neuron
    part, and compared with its own run: {level: {"run", "setting", "effects"}} (answer-level metrics)."""
    p = PERTURBATIONS["batch"]
    config = p.eval_config(eval_config)
    by_level: dict[str, Any] = {}
    for level, (path, run_dir) in levels.items():
        if progress:
            progress.step(f"noise floor · {eval_config.task} · {level} with {p.describe(eval_config)}")
        result = run_level_files({level: path}, config, out / _dir_name("batch", config), resume=not force,
                                 force=force, progress=progress)
        comparison = compare_runs(Path(run_dir), result.run_dirs[level], n_boot=eval_config.n_boot)
        by_level[level] = {"run": str(result.run_dirs[level]), "setting": p.describe(eval_config),
                           "effects": effects(comparison)}
    return by_level


def text_kld_floor(ref_path: Path, base_file: Path, settings: KLDSettings, out: Path, *,
                   perturbations: list[str] | None = None) -> dict[str, Any]:
    """The reference file scored against its own base (made at the study's settings) under each
    perturbation; cached in OUT/kld.json by base and settings."""
    cache_path = out / "kld.json"
    cache = read_json(cache_path) if cache_path.exists() else {}
    figures: dict[str, Any] = {}
    for name in perturbations or list(PERTURBATIONS):
        s = PERTURBATIONS[name].kld_settings(settings)
        key = f"{Path(base_file).name} {s}"
        if (cache.get(name) or {}).get("key") != key:
            cache[name] = {"key": key, "figures": score_model(ref_path, Path(base_file), s)}
            write_json(cache_path, cache)
        figures[name] = cache[name]["figures"]
    by_name = {name: text_kld_effects(f) for name, f in figures.items()}
    return {"effects": by_name, "floor": noise_floor(by_name)}


def study_floor(reference: str, ref_path: Path, tasks: dict[str, dict[str, Any]], out: Path, *,
                neurons: NeuronAnalysis | None = None, kld_base: Path | None = None,
                kld_settings: KLDSettings | None = None, force: bool = False,
                progress: RunProgress | None = None) -> dict[str, Any]:
    """The whole floor of a study. tasks: per task {"eval_config", "run_dir" (the reference's run),
    "neurons" (the reference's neuron figures or None), optionally "levels" (task_floor's)}."""
    t0 = time.perf_counter()
    section: dict[str, Any] = {"reference": reference,
                               "perturbations": {n: p.phrase for n, p in PERTURBATIONS.items()},
                               "definitions": DEFINITIONS, "tasks": {}}
    for task, t in tasks.items():
        section["tasks"][task] = task_floor(reference, ref_path, Path(t["run_dir"]), t["eval_config"],
                                            out / task, ref_neurons=t.get("neurons"), neurons=neurons,
                                            levels=t.get("levels"), force=force, progress=progress)
    if kld_base is not None and kld_settings is not None and Path(kld_base).exists():
        if progress:
            progress.step(f"noise floor · text KLD of {reference} against itself")
        section["text_kld"] = text_kld_floor(ref_path, Path(kld_base), kld_settings, out)
    section["seconds"] = time.perf_counter() - t0
    return section
