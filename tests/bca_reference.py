"""The BCa bootstrap interval written out from its definition, for tests to check the library against.

Efron & Tibshirani, An Introduction to the Bootstrap (1993), 14.3 (eqs. 14.10, 14.14, 14.15): from the
bootstrap replicates, the point estimate and the n leave-one-out (jackknife) values. Written with Python
lists and the standard library's NormalDist, so it shares no code with ggml_probe.analysis.calibration.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def bca_written_out(replicates, estimate, jackknife, alpha=0.05, rel_tol=1e-12):
    """(low, high): the replicates' percentiles at the BCa levels.

    Ties (replicates equal to the estimate, up to `rel_tol` since a difference of two means can round
    either way) count half below, as scipy's percentile of score does.
    """
    norm = NormalDist()
    values = [float(r) for r in replicates]
    tie = [math.isclose(r, estimate, rel_tol=rel_tol, abs_tol=1e-15) for r in values]
    below = sum(1 for r, t in zip(values, tie) if r < estimate and not t)
    z0 = norm.inv_cdf((below + sum(tie) / 2) / len(values))
    mean = sum(jackknife) / len(jackknife)
    squares = sum((mean - j) ** 2 for j in jackknife)
    accel = sum((mean - j) ** 3 for j in jackknife) / (6 * squares**1.5) if squares > 0 else 0.0
    levels = []
    for z in (norm.inv_cdf(alpha / 2), norm.inv_cdf(1 - alpha / 2)):
        levels.append(norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z))))
    return tuple(float(v) for v in np.percentile(values, [100 * q for q in levels]))


def leave_one_out(metric, arrays):
    """metric(*arrays without example i) for each i, by list comprehension."""
    n = len(arrays[0])
    return [metric(*[[a[k] for k in range(n) if k != i] for a in arrays]) for i in range(n)]
