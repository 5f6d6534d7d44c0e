"""A synthetic head-training benchmark with known heteroscedastic noise, in the reference CSV layout.

Columns: ``spender_0..S-1, Z, reg, w1mpro..w4mpro, w1sigmpro..w4sigmpro`` (as the Jespersen et al.
2025 table), plus ``id`` and the noise-free truth ``w?_true`` and intrinsic scatter ``w?_scatter``.
Magnitudes are smooth non-linear functions of the features; each object has an intrinsic
scatter that depends on the latents (heteroscedastic, what the head must learn) and an
observed error (heteroscedastic, given). Some W3/W4 values are non-detections (σ = 9999).
A calibrated model reaches χ²_N ≈ 1 and nominal coverage on it.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

__all__ = ["synthetic_reference_table"]


def synthetic_reference_table(n: int = 20000, seed: int = 0, n_latent: int = 6, nondetection_fraction: float = 0.03) -> pa.Table:
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, n_latent))
    z = rng.uniform(0.02, 0.3, n)
    reg = rng.normal(1.0, 0.3, n)  # log10(norm)
    base = 15.0 - 2.5 * reg + 5 * np.log10(z / 0.1)
    true = np.stack([
        base + 0.3 * s[:, 0],
        base - 0.1 + 0.2 * s[:, 1] + 0.3 * np.tanh(s[:, 2]),
        base - 3.0 + 0.6 * s[:, 2] - 0.4 * s[:, 0] + 0.2 * s[:, 3] ** 2,
        base - 5.5 + 0.5 * s[:, 3] + 0.3 * s[:, 2],
    ], 1)
    scatter = np.stack([0.05 + 0.05 * np.abs(s[:, 4]), 0.06 + 0.05 * np.abs(s[:, 4]),
                        0.10 + 0.10 * np.abs(s[:, 5]), 0.15 + 0.10 * np.abs(s[:, 5])], 1)
    obs_err = np.stack([rng.uniform(0.02, 0.06, n), rng.uniform(0.03, 0.08, n),
                        rng.uniform(0.05, 0.3, n), rng.uniform(0.1, 0.5, n)], 1)
    mag = true + rng.normal(size=true.shape) * np.sqrt(scatter**2 + obs_err**2)
    nd = rng.random((n, 4)) < np.array([0, 0, 0.5, 1.0]) * nondetection_fraction
    obs_err = np.where(nd, 9999.0, obs_err)
    cols = {"id": np.arange(n)}
    cols.update({f"spender_{i}": s[:, i].astype(np.float32) for i in range(n_latent)})
    cols.update({"Z": z, "reg": reg})
    for j, b in enumerate(("w1", "w2", "w3", "w4")):
        cols[f"{b}mpro"] = mag[:, j]
    for j, b in enumerate(("w1", "w2", "w3", "w4")):
        cols[f"{b}sigmpro"] = obs_err[:, j]
    for j, b in enumerate(("w1", "w2", "w3", "w4")):
        cols[f"{b}_true"] = true[:, j]
        cols[f"{b}_scatter"] = scatter[:, j]
    return pa.table(cols)
