"""Comparing finished runs of the same task across quantization levels against a reference level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import agreement as ag
from ..analysis.calibration import PAIRED_DELTA_DEFINITION, paired_deltas
from ..errors import ProbeError
from .rundir import read_json


# Nominal precision order for choosing the default reference level (highest first).
_PRECISION = ["F32", "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
              "IQ4_XS", "IQ4_NL", "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS",
              "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]


def highest_precision(bits_per_weight: dict[str, float]) -> str:
    """The highest-precision level: by bits per weight, the nominal order (_PRECISION) breaking ties."""
    def key(level: str) -> tuple[float, int]:
        rank = _PRECISION.index(level) if level in _PRECISION else len(_PRECISION)
        return (-bits_per_weight[level], rank)

    return min(bits_per_weight, key=key)


def reference_level(run_dirs: dict[str, Path]) -> str:
    """The highest-precision level of finished runs, by their measured bits per weight."""
    return highest_precision({level: read_json(run_dirs[level] / "manifest.json")["model"]["bits_per_weight"]
                              for level in run_dirs})


def _load(run_dir: Path) -> dict[str, Any]:
    import pandas as pd

    manifest = read_json(run_dir / "manifest.json")
    if manifest.get("status") != "complete":
        raise ProbeError(f"{run_dir} is not a finished run")
    out = {"manifest": manifest, "pred": pd.read_parquet(run_dir / "predictions.parquet")}
    for name in ("logits", "hidden"):
        p = run_dir / f"{name}.npy"
        out[name] = np.load(p, mmap_mode="r") if p.exists() else None
    return out


def compare_runs(ref_dir: Path, run_dir: Path, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Agreement, flips, KL (label set and full vocabulary), top-1 agreement, hidden-state similarity, and
    every calibration metric's change with its paired bootstrap interval (`paired_deltas`: the same example
    indices resampled for both levels)."""
    ref, q = _load(Path(ref_dir)), _load(Path(run_dir))
    pr, pq = ref["pred"], q["pred"]
    if len(pr) != len(pq) or not (pr["id"].astype(str).values == pq["id"].astype(str).values).all():
        raise ProbeError(f"{ref_dir} and {run_dir} did not run the same examples; compare runs of the same task and data")
    if ref["manifest"]["identity"]["data_sha256"] != q["manifest"]["identity"]["data_sha256"]:
        raise ProbeError(f"{ref_dir} and {run_dir} used different data")
    labels = [c for c in pr.columns if c.startswith("p_")]
    p_ref, p_q = pr[labels].to_numpy(), pq[labels].to_numpy()
    gold = pr["gold_index"].to_numpy()
    fl = ag.flips(pr["pred_index"].to_numpy(), pq["pred_index"].to_numpy(), gold)
    kl_label = ag.kl_divergence(p_ref, p_q)
    out: dict[str, Any] = {
        "reference": ref["manifest"]["quant"],
        "level": q["manifest"]["quant"],
        "n": int(len(pr)),
        "agreement": ag.prediction_agreement(pr["pred_index"], pq["pred_index"]),
        "paper_agreement": ag.prediction_agreement(pr["paper_token"], pq["paper_token"]),
        "flips": fl.counts(),
        "flipped_ids": [str(pr["id"].iloc[i]) for i in fl.changed],
        "kl_label_mean": float(kl_label.mean()),
        "kl_label_max": float(kl_label.max()),
    }
    out["paired_deltas"] = {
        "n_boot": int(n_boot), "alpha": 0.05, "seed": int(seed), "definition": PAIRED_DELTA_DEFINITION,
        "label_set": paired_deltas(pr["confidence"], pr["correct"], pq["confidence"], pq["correct"],
                                   ref_prob_matrix=p_ref, prob_matrix=p_q, gold_index=gold, n_boot=n_boot, seed=seed),
        "paper": paired_deltas(pr["paper_confidence"], pr["paper_correct"], pq["paper_confidence"], pq["paper_correct"],
                               n_boot=n_boot, seed=seed),
    }
    out["accuracy_delta"] = out["paired_deltas"]["label_set"]["accuracy"]  # the headline change, label-set scoring
    if ref["logits"] is not None and q["logits"] is not None:
        kl_full = ag.kl_divergence_from_logits(ref["logits"], q["logits"])
        out["kl_full_mean"] = float(kl_full.mean())
        out["kl_full_p99"] = float(np.percentile(kl_full, 99))
        out["top1_agreement"] = ag.top1_agreement(ref["logits"], q["logits"])
    if ref["hidden"] is not None and q["hidden"] is not None:
        cos = ag.cosine_similarity_rows(ref["hidden"], q["hidden"])
        out["hidden_cosine_mean"] = float(np.nanmean(cos))
        out["hidden_cosine_min"] = float(np.nanmin(cos))
        out["hidden_cka"] = float(ag.linear_cka(ref["hidden"], q["hidden"])) if len(pr) > 1 else None
    out["definitions"] = {
        "agreement": "fraction of examples with the same label-set prediction as the reference",
        "kl_label": "KL(P_ref || P_level) of the label-set distribution, per example, mean and max",
        "kl_full": "KL(P_ref || P_level) of the full next-token distribution at the answer position (float16 logits)",
        "top1_agreement": "fraction of examples whose full-vocabulary argmax token equals the reference's (llama-perplexity 'same top p')",
        "hidden_cosine": "cosine of the final hidden states (result_norm) at the answer position, per example",
        "hidden_cka": "linear CKA of the final hidden states over the dataset (Kornblith et al. 2019)",
        "accuracy_delta": "accuracy(level) − accuracy(reference) under label-set scoring (paired_deltas.label_set.accuracy)",
        "paired_deltas": ("per scoring (label_set, paper), the change of every calibration metric of the runs "
                          "(Brier and NLL: label-set scoring only), with its paired bootstrap interval"),
    }
    return out


def compare_levels(run_dirs: dict[str, Path], reference: str | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """Every level against the reference (default: the highest-precision level)."""
    if not run_dirs:
        raise ProbeError("no runs to compare")
    ref = reference or reference_level(run_dirs)
    if ref not in run_dirs:
        raise ProbeError(f"reference level {ref} is not among the runs ({', '.join(run_dirs)})")
    return {"reference": ref, "levels": {lvl: compare_runs(run_dirs[ref], d, n_boot) for lvl, d in run_dirs.items() if lvl != ref}}
