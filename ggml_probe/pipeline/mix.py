"""`ggml-probe mix`: per-tensor types under a size budget, written with llama.cpp's quantizer and measured.

1. Sensitivity (pipeline/sensitivity.py): each tensor's text KLD at the low type, measured per group
   (per kind over all layers, per layer for the most sensitive kinds) and split by the static estimate.
2. Each tensor's KLD at any other candidate type is scaled by its static error there:
       cost(u, t) = KLD(u, low) · E(u, t) / E(u, low)      (E: Σ δW²·E[x²], weights/type_error.py)
   — the KLD of a small weight perturbation is quadratic in it, so proportional to E to first order.
3. The types: the multiple-choice knapsack of analysis/mix.py under the budget (a stock file's size,
   `--budget-of Q4_K_M`, or bits per weight, `--bpw 4.8`), more bytes where KLD saved per byte is highest.
4. The file is written with one --tensor-type override per tensor, its types checked against the
   request, and its text KLD measured beside the stock file's on the same reference base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf

from ..analysis.mix import allocate, smallest_size
from ..errors import ProbeError
from ..fsutil import sha256_file
from ..models.ggufinfo import inspect_gguf
from ..models.quant_types import QUANT_TYPES, normalize_quant
from ..models.quantize import GGML_TYPES, MixOptions, QuantResult, quantizable_names, quantize_ladder
from ..weights.type_error import fits
from .kld import KLDSettings, score_model
from .rundir import write_json
from .sensitivity import ProbeCache, measure_sensitivity, tensor_pattern

# Types a mix may give a tensor (those whose block divides its rows): the k-quants and the 32-blocks.
CANDIDATE_TYPES = ("Q2_K", "Q3_K", "Q4_0", "IQ4_NL", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
# Stock file types a --bpw budget is compared with (the largest that fits).
STOCK_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_S", "Q5_K_M",
               "Q6_K", "Q8_0")
_ALIGN = 32  # GGUF's default data alignment
# The output's header holds the source's keys plus ggml-probe's (provenance, the overrides' summary of at
# most 127 bytes): reserved so that the written file stays under the budget.
_HEADER_SLACK = 512

Progress = Callable[[str], None]


@dataclass
class MixResult:
    budget_bytes: int
    budget: str  # "Q4_K_M" or "4.8 bpw"
    mix: dict[str, Any]
    stock: dict[str, Any]
    sensitivity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _type_bytes(n_elements: int, type_name: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return n_elements // block * size


def _figures(path: Path, quant: QuantResult | None, kld: dict[str, Any]) -> dict[str, Any]:
    info = quant.info if quant is not None else inspect_gguf(path)
    return {"path": str(path), "size_bytes": info.size_bytes, "bits_per_weight": info.bits_per_weight,
            "kld_mean": kld["kld_mean"], "kld_mean_se": kld["kld_mean_se"], "kld_p99": kld.get("kld_p99"),
            "same_top_p": kld["same_top_p"], "ppl_ratio": kld["ppl_ratio"], "tensor_types": info.tensor_types}


def _scored(path: Path, base_file: Path, settings: KLDSettings, cache: ProbeCache) -> dict[str, Any]:
    """A file's KLD figures against the base, cached by the file's hash."""
    key = f"kld|{sha256_file(path)[:16]}|{base_file.stem}"
    hit = cache.get(key)
    if hit is None:
        hit = score_model(path, base_file, settings)
        cache.put(key, hit)
    return hit


def run_mix(source: str | Path, reference: str | Path, text: str, low_type: str, out: Path, *,
            budget_of: str | None = None, bpw: float | None = None, work_dir: Path | None = None,
            imatrix: str | Path | None = None, candidates: tuple[str, ...] = CANDIDATE_TYPES,
            per_layer_kinds: int = 1, settings: KLDSettings | None = None, force: bool = False,
            progress: Progress | None = None) -> MixResult:
    """Choose, write and measure a mix under the budget; the stock file of the same budget beside it."""
    if (budget_of is None) == (bpw is None):
        raise ProbeError("give one budget: --budget-of QUANT (a stock file's size) or --bpw BITS")
    s = settings or KLDSettings()
    source, reference, out = Path(source), Path(reference), Path(out)
    work = Path(work_dir) if work_dir else out.parent / f"{out.stem}.mix-work"
    say = progress or (lambda _msg: None)
    if out.exists() and not force:
        raise ProbeError(f"{out} exists (pass --force to overwrite)")
    unknown = [t for t in candidates if t not in GGML_TYPES]
    if unknown:
        raise ProbeError(f"unknown candidate type {unknown[0]!r}; valid: {', '.join(CANDIDATE_TYPES)}, F16, ...")
    types = {t: GGML_TYPES[t] for t in candidates}
    info = inspect_gguf(source)
    units = quantizable_names(info)
    by_name = {t.name: t for t in info.tensors}

    # Sizes: every tensor at every candidate type its rows fit; the rest of the file as the source holds it.
    size = {u: {t: _aligned(_type_bytes(by_name[u].n_elements, t)) for t, tid in types.items()
                if fits(tid, by_name[u].shape[0])} for u in units}
    empty = [u for u, options in size.items() if not options]
    if empty:
        raise ProbeError(f"no candidate type fits the rows of {empty[0]} ({by_name[empty[0]].shape[0]} columns)")
    fixed = info.size_bytes - sum(_aligned(by_name[u].n_bytes) for u in units) + _HEADER_SLACK

    # The budget, and the stock file it is compared with (quantized for real: its KLD is measured), named
    # by the source and the imatrix it was quantized with, so another imatrix never reuses it.
    stock_stem = sha256_file(source)[:8] + (f"-im{sha256_file(Path(imatrix))[:8]}" if imatrix else "")
    if budget_of is not None:
        stock_quant = normalize_quant(budget_of)
        stock_path = work / f"stock-{stock_stem}-{stock_quant}.gguf"
        say(f"stock {stock_quant}")
        stock = quantize_ladder(source, [stock_quant], out_file=stock_path, allow_requantize=True,
                                skip_existing=True, imatrix=imatrix, nthread=s.threads or 0)[0]
        budget_bytes, budget_label = stock.info.size_bytes, stock_quant
    else:
        data_bytes = int(bpw * info.n_params / 8)
        budget_bytes = data_bytes + (info.size_bytes - sum(_aligned(t.n_bytes) for t in info.tensors))
        budget_label = f"{bpw:g} bpw"
        planned = quantize_ladder(source, list(STOCK_TYPES), out_dir=work, allow_requantize=True, dry_run=True,
                                  imatrix=imatrix, nthread=s.threads or 0)
        fitting = [r for r in planned if r.info.size_bytes <= budget_bytes]
        stock_quant = max(fitting, key=lambda r: r.info.size_bytes).quant if fitting else None
        stock = None
        if stock_quant is not None:
            stock_path = work / f"stock-{stock_stem}-{stock_quant}.gguf"
            say(f"stock {stock_quant}")
            stock = quantize_ladder(source, [stock_quant], out_file=stock_path, allow_requantize=True,
                                    skip_existing=True, imatrix=imatrix, nthread=s.threads or 0)[0]
    smallest = fixed + smallest_size(size)
    if smallest > budget_bytes:
        raise ProbeError(f"the budget of {budget_bytes} bytes ({budget_label}) is below the smallest possible file: "
                         f"{smallest} bytes (every tensor at its smallest type among {', '.join(candidates)})")

    sens = measure_sensitivity(source, reference, text, low_type, work, imatrix=imatrix, types=types,
                               per_layer_kinds=per_layer_kinds, settings=s, progress=say)
    cost = {}
    for u in units:
        low = sens.tensor_low_type.get(u, low_type)
        e_low = sens.errors[u].get(low) or max(sens.errors[u].values())
        cost[u] = {t: sens.tensor_cost.get(u, 0.0) * (sens.errors[u][t] / e_low if e_low > 0 else 1.0)
                   for t in size[u]}
    allocation = allocate(size, cost, budget_bytes - fixed)

    say(f"writing {out.name}")
    options = MixOptions([(tensor_pattern(u), t) for u, t in allocation.types.items()])
    ftype = stock_quant if stock_quant in QUANT_TYPES else "Q8_0"
    written = quantize_ladder(source, [ftype], mix=options, out_file=out, allow_requantize=True, force=True,
                              imatrix=imatrix, nthread=s.threads or 0)[0]
    got = {t.name: t.type for t in written.info.tensors}
    wrong = {u: (t, got.get(u)) for u, t in allocation.types.items() if got.get(u) != t}
    if wrong:
        u, (asked, used) = next(iter(wrong.items()))
        raise ProbeError(f"llama.cpp wrote {u} as {used}, not {asked} ({len(wrong)} tensors differ)")

    base_file = Path(sens.base_file)
    cache = ProbeCache(work / "sensitivity-cache.json")
    say(f"text KLD of {out.name}")
    mix_figures = _figures(out, written, _scored(out, base_file, s, cache))
    mix_figures.update(predicted_kld=allocation.predicted_cost, types=allocation.types)
    stock_figures: dict[str, Any] = {"quant": stock_quant}
    if stock is not None:
        say(f"text KLD of {stock.path.name}")
        stock_figures.update(_figures(stock.path, stock, _scored(stock.path, base_file, s, cache)))
    result = MixResult(budget_bytes, budget_label, mix_figures, stock_figures, sens.to_dict())
    write_json(work / "mix.json", result.to_dict())
    return result


def override_patterns(types: dict[str, str]) -> list[str]:
    """The mix as llama-quantize arguments (--tensor-type REGEX=TYPE), for users who rebuild it elsewhere."""
    return [f"{tensor_pattern(u)}={t}" for u, t in types.items()]

