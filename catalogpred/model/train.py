"""Fitting the IR head with the Gaussian negative log-likelihood.

χ² convention (stated everywhere): χ = (m_pred − m_obs) / sqrt(σ_pred² + σ_obs²),
χ²_N = mean of χ² per band. Training minimises the NLL with variance σ_pred² + σ_obs².
Missing bands and non-detections (NaN magnitude, or σ_obs ≥ 9999 as in AllWISE
tables) carry no weight.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .head import IRHead

__all__ = ["fit_head", "evaluate_head", "NONDETECTION_SIGMA"]

log = logging.getLogger(__name__)

#: σ_obs at or above this marks a non-detection (the reference data use 9999).
NONDETECTION_SIGMA = 99.0


def _valid(mag, err):
    return np.isfinite(mag) & np.isfinite(err) & (err > 0) & (err < NONDETECTION_SIGMA)


def fit_head(x: np.ndarray, mag: np.ndarray, mag_err: np.ndarray, *, n_hidden=(64, 64), epochs: int = 300,
             batch_size: int = 256, lr: float = 3e-3, weight_decay: float = 1e-5, val_fraction: float = 0.2,
             patience: int = 20, seed: int = 0) -> tuple[IRHead, dict]:
    """Fit an :class:`IRHead` on features ``x`` and observed magnitudes.

    Parameters
    ----------
    x : float32 [N, F]
        Head features (:func:`~catalogpred.model.head.head_features`).
    mag, mag_err : float [N, 4]
        Observed W1–W4 Vega magnitudes and 1σ errors (NaN or ≥ 99 = missing).
    epochs, batch_size, lr, weight_decay, patience : training settings (mini-batch Adam, learning rate halved
        on plateaus, early stopping on the validation NLL after ``patience`` epochs without improvement)
    seed : int
        Fixes the split and the initial weights.

    Returns
    -------
    head : IRHead (best validation epoch), metrics : dict with per-band ``chi2_n``, ``mae``, ``bias``,
    ``coverage_68``, ``coverage_95`` on the validation split.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, n_in = x.shape
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    val, tr = perm[:n_val], perm[n_val:]
    valid = _valid(mag, mag_err)
    head = IRHead(n_in=n_in, n_hidden=tuple(n_hidden), n_bands=mag.shape[1])
    with torch.no_grad():
        head.x_mean.copy_(torch.as_tensor(x[tr].mean(0)))
        head.x_std.copy_(torch.as_tensor(x[tr].std(0) + 1e-6))
        m = np.where(valid, mag, np.nan)[tr]
        head.y_mean.copy_(torch.as_tensor(np.nanmean(m, 0)))
        head.y_std.copy_(torch.as_tensor(np.nanstd(m, 0) + 1e-3))

    def tensors(idx):
        w = torch.as_tensor(valid[idx], dtype=torch.float32)
        return (torch.as_tensor(x[idx], dtype=torch.float32),
                torch.as_tensor(np.where(valid[idx], mag[idx], 0.0), dtype=torch.float32),
                torch.as_tensor(np.where(valid[idx], mag_err[idx], 1.0), dtype=torch.float32), w)

    xt, yt, et, wt = tensors(tr)
    xv, yv, ev, wv = tensors(val)

    def nll(xb, yb, eb, wb):
        mean, sigma = head(xb)
        var = sigma**2 + eb**2
        return (wb * (0.5 * torch.log(var) + 0.5 * (mean - yb) ** 2 / var)).sum() / wb.sum().clamp(min=1)

    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, patience // 4))
    best, best_state, since = np.inf, None, 0
    n_tr = len(tr)
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(n_tr, generator=g)
        for lo in range(0, n_tr, batch_size):
            idx = order[lo:lo + batch_size]
            opt.zero_grad()
            loss = nll(xt[idx], yt[idx], et[idx], wt[idx])
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            v = float(nll(xv, yv, ev, wv))
        sched.step(v)
        if v < best - 1e-4:
            best, since = v, 0
            best_state = {k: t.clone() for k, t in head.state_dict().items()}
        else:
            since += 1
            if since > patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    log.info("head fit: %d train, %d validation rows, stopped at epoch %d, val NLL %.4f", len(tr), len(val), epoch, best)
    with torch.no_grad():
        mean, sigma = head(torch.as_tensor(x[val], dtype=torch.float32))
    metrics = evaluate_head(mean.numpy(), sigma.numpy(), mag[val], mag_err[val])
    metrics.update({"n_train": int(len(tr)), "n_validation": int(len(val)), "epochs": int(epoch + 1), "val_nll": best})
    return head, metrics


def evaluate_head(pred: np.ndarray, pred_sigma: np.ndarray, mag: np.ndarray, mag_err: np.ndarray,
                  bands=("w1", "w2", "w3", "w4")) -> dict:
    """Per-band χ²_N, MAE, bias (pred − obs), and 68%/95% coverage of the total-σ interval."""
    out = {}
    valid = _valid(mag, mag_err)
    for j, b in enumerate(bands):
        v = valid[:, j]
        if not v.any():
            out[b] = {"n": 0}
            continue
        d = pred[v, j] - mag[v, j]
        s = np.sqrt(pred_sigma[v, j] ** 2 + mag_err[v, j] ** 2)
        chi = d / s
        out[b] = {
            "n": int(v.sum()),
            "chi2_n": float(np.mean(chi**2)),
            "mae": float(np.mean(np.abs(d))),
            "bias": float(np.mean(d)),
            "coverage_68": float(np.mean(np.abs(chi) < 1.0)),
            "coverage_95": float(np.mean(np.abs(chi) < 1.959964)),
        }
    return out
