"""Out-of-distribution score in latent space: squared Mahalanobis distance to the training latents.

The bundle stores the training latents' mean and covariance; ``ood_score`` =
(s − μ)ᵀ Σ⁻¹ (s − μ). For Gaussian latents it follows χ² with S degrees of freedom, so
the flag threshold is the χ²_S quantile ``quantile`` (default 0.999: 1 in 1000 training-like
spectra is flagged). Pure numpy (no torch), so it runs anywhere.
"""
from __future__ import annotations

import numpy as np

__all__ = ["fit_latent_density", "ood_score", "DEFAULT_QUANTILE"]

DEFAULT_QUANTILE = 0.999


def fit_latent_density(latents: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> dict:
    """Mean, covariance and flag threshold of training latents float [n, S] (JSON-ready dict)."""
    from scipy.stats import chi2

    latents = np.asarray(latents, np.float64)
    mean = latents.mean(0)
    cov = np.cov(latents, rowvar=False) + 1e-9 * np.eye(latents.shape[1])
    return {"latent_mean": mean.tolist(), "latent_cov": cov.tolist(), "quantile": quantile,
            "threshold": float(chi2.ppf(quantile, df=latents.shape[1])), "n_train": int(len(latents))}


def ood_score(latents: np.ndarray, density: dict) -> np.ndarray:
    """float32 [n]: squared Mahalanobis distance of latents [n, S] from the training distribution."""
    mean = np.asarray(density["latent_mean"])
    prec = np.linalg.inv(np.asarray(density["latent_cov"]))
    d = np.asarray(latents, np.float64) - mean
    return np.einsum("ij,jk,ik->i", d, prec, d).astype(np.float32)
