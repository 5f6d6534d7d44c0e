"""Fitting the IR head with the Gaussian negative log-likelihood.

χ² convention (stated everywhere): χ = (m_pred − m_obs) / sqrt(σ_pred² + σ_obs²),
χ²_N = mean of χ² per band. Training minimises the NLL with variance σ_pred² + σ_obs².
Missing bands and non-detections (NaN magnitude, or σ_obs ≥ 99, e.g. the 9999 of AllWISE-derived
tables) carry no weight.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import ConfigError
from ..tables import BANDS, NON_DETECTION_SIGMA
from .head import IRHead

__all__ = ["fit_head", "evaluate_head"]

log = logging.getLogger(__name__)


#: usable observations a band needs, in training, and rows a validation or test split should have
MIN_BAND_ROWS = 10


def _valid(mag, err):
    """Usable observed magnitudes: finite, with an error below the non-detection level."""
    return np.isfinite(mag) & np.isfinite(err) & (err > 0) & (err < NON_DETECTION_SIGMA)


def fit_head(x: np.ndarray, mag: np.ndarray, mag_err: np.ndarray, *, n_hidden=(64, 64), epochs: int = 300,
             batch_size: int | None = None, lr: float = 3e-3, weight_decay: float = 1e-5, val_fraction: float = 0.2,
             patience: int = 20, seed: int = 0, train_idx=None, val_idx=None,
             progress: bool = False) -> tuple[IRHead, dict]:
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
    train_idx, val_idx : int arrays, optional
        An explicit split (e.g. :func:`split_by_hash`); default: a random ``val_fraction`` split.
    batch_size : int, optional
        Default n_train/16 within [256, 8192], so 500k rows train in minutes on a CPU.

    Returns
    -------
    head : IRHead (best validation epoch), metrics : dict with per-band ``chi2_n``, ``mae``, ``bias``,
    ``coverage_68``, ``coverage_95`` on the validation split.
    """
    torch.manual_seed(seed)
    n, n_in = x.shape
    if train_idx is not None and val_idx is not None:
        tr, val = np.asarray(train_idx), np.asarray(val_idx)
    else:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_val = max(1, int(round(val_fraction * n)))
        val, tr = perm[:n_val], perm[n_val:]
    batch_size = batch_size or int(np.clip(len(tr) // 16, 256, 8192))
    g = torch.Generator().manual_seed(seed)
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
    from tqdm.auto import tqdm

    bar = tqdm(total=epochs, desc=f"head seed {seed}", unit="epoch", disable=not progress, leave=False)
    for epoch in range(epochs):
        bar.update(1)
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
    bar.close()
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


# ---------------------------------------------------------------------------------------------- tables → bundles

def split_by_hash(ids, fractions=(0.8, 0.1, 0.1), salt: str = "catalogpred") -> np.ndarray:
    """Deterministic train/validation/test labels (0/1/2) from a hash of each id (stable across runs and machines)."""
    import hashlib

    u = np.array([int.from_bytes(hashlib.blake2b(f"{salt}:{i}".encode(), digest_size=8).digest(), "little") / 2**64
                  for i in ids])
    c = np.cumsum(fractions) / np.sum(fractions)
    return np.searchsorted(c, u, side="right").clip(0, 2)


def read_training_table(path, mag_system: str = "auto") -> dict:
    """Read a training table: latents, z, normalisation feature, WISE mags and errors.

    Accepted layouts (case-insensitive):

    - the reference work's CSV: ``spender_0..S-1, Z, reg, w1mpro..w4mpro, w1sigmpro..w4sigmpro``
      (``reg`` is taken as the normalisation feature, i.e. log10(norm) — an assumption recorded in the card);
    - catalogpred's: ``latent_0..`` (or a ``latent`` list column), ``z``, ``norm`` (1e-17 erg/s/cm²/Å),
      and observed W1-W4 in any of the names :func:`~catalogpred.tables.find_photometry_columns` knows
      (``w1mpro``/``w1sigmpro``, ``w1_mag_obs``/``w1_mag_obs_err``, ``W1mag``/``e_W1mag``, ...), Vega or, with
      ``mag_system="ab"`` or an AB unit on the column, AB (converted to Vega).

    Returns dict with ``ids``, ``latents`` [n, S], ``z`` [n], ``log_norm`` [n], ``mag``/``mag_err`` [n, 4], ``layout``.
    """
    import pyarrow as pa

    from ..tables import read_table_any, wise_vega_magnitudes

    t = read_table_any(str(path))
    cols = {c.lower(): c for c in t.column_names}

    def col(name):
        return t.column(cols[name]).to_numpy(zero_copy_only=False)

    latent_type = t.schema.field(cols["latent"]).type if "latent" in cols else None
    if latent_type is not None and (pa.types.is_fixed_size_list(latent_type) or pa.types.is_list(latent_type)
                                    or pa.types.is_large_list(latent_type)):
        arr = t.column(cols["latent"]).combine_chunks()
        sizes = set(pa.compute.list_value_length(arr).to_pylist()) if not pa.types.is_fixed_size_list(latent_type) else {arr.type.list_size}
        if len(sizes) != 1 or arr.null_count:
            raise ConfigError(f"{path}: the latent column has lists of lengths {sorted(s for s in sizes if s)} "
                              "(or nulls); every row needs the same number of latents")
        latents = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(arr), sizes.pop())
        layout = "catalogpred"
    else:
        for prefix, lay in (("spender_", "reference"), ("latent_", "catalogpred")):
            names = sorted((c for c in cols if c.startswith(prefix) and c[len(prefix):].isdigit()),
                           key=lambda c: int(c[len(prefix):]))
            if names:
                latents = np.stack([col(c) for c in names], 1).astype(np.float32)
                layout = lay
                break
        else:
            raise ConfigError(f"{path}: no latent columns (spender_0.. / latent_0.. / a latent list column)")
    if "z" not in cols:
        raise ConfigError(f"{path}: no z column")
    if "norm" in cols:
        log_norm = np.log10(col("norm").astype(np.float64))
    elif "reg" in cols:
        log_norm = col("reg").astype(np.float64)
    else:
        raise ConfigError(f"{path}: no normalisation column (norm, or reg in the reference layout)")
    mag, mag_err, _ = wise_vega_magnitudes(t, mag_system, what=str(path))
    id_col = next((cols[c] for c in ("source_id", "specobjid", "targetid", "id", "objid") if c in cols), None)
    ids = t.column(id_col).to_pylist() if id_col else list(range(t.num_rows))
    out = {"ids": ids, "latents": latents, "z": col("z").astype(np.float64), "log_norm": log_norm,
           "mag": mag, "mag_err": mag_err, "layout": layout, "source": str(path)}
    if "model_id" in cols:  # a catalog export: the bundle that predicted each row (its encoder made the latents)
        out["model_ids"] = sorted({str(m) for m in t.column(cols["model_id"]).to_pylist() if m is not None})
    return out


def calibrate_sigma_scale(mean: np.ndarray, sigma: np.ndarray, mag: np.ndarray, mag_err: np.ndarray) -> np.ndarray:
    """Per-band factor s on the predicted σ so that 68.27% of held-out rows have |χ| < 1.

    χ uses the total σ: (m_pred − m_obs)/sqrt((s·σ)² + σ_obs²). Matching the central interval is
    robust to the heavier-than-Gaussian tails of an ensemble (post-hoc calibration on the validation
    split, like temperature scaling); 1 where a band has fewer than 10 valid rows.
    """
    valid = _valid(mag, mag_err)
    grid = np.exp(np.linspace(np.log(0.2), np.log(5.0), 641))
    out = np.ones(mag.shape[1])
    for j in range(mag.shape[1]):
        v = valid[:, j]
        if v.sum() < 10:
            continue
        d = np.abs(mean[v, j] - mag[v, j])
        tot = np.sqrt((grid[:, None] * sigma[v, j][None, :]) ** 2 + mag_err[v, j][None, :] ** 2)
        cover = (d[None, :] < tot).mean(1)
        out[j] = grid[np.argmin(np.abs(cover - 0.6827))]
    return out


def fit_ensemble(x: np.ndarray, mag: np.ndarray, mag_err: np.ndarray, split: np.ndarray, *, n_members: int = 5,
                 seed: int = 0, **kw):
    """Train ``n_members`` heads (different seeds, same split: 0 train, 1 validation) into a HeadEnsemble.

    Returns ``(ensemble, metrics on the test rows (split == 2), or on validation if there is no test row)``.
    """
    from .head import HeadEnsemble

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP trains faster on one thread than on oversubscribed ones
    try:
        return _fit_ensemble(x, mag, mag_err, split, n_members=n_members, seed=seed, HeadEnsemble=HeadEnsemble, **kw)
    finally:
        torch.set_num_threads(threads)


def _fit_ensemble(x, mag, mag_err, split, *, n_members, seed, HeadEnsemble, **kw):
    members = []
    idx_tr, idx_va, idx_te = (np.flatnonzero(split == k) for k in (0, 1, 2))
    for m in range(n_members):
        head, _ = fit_head(x, mag, mag_err, seed=seed + m, train_idx=idx_tr, val_idx=idx_va, **kw)
        members.append(head)
    ens = HeadEnsemble(members).eval()
    with torch.no_grad():
        mean_v, sigma_v = ens(torch.as_tensor(x[idx_va], dtype=torch.float32))
    scale = calibrate_sigma_scale(mean_v.numpy(), sigma_v.numpy(), mag[idx_va], mag_err[idx_va])
    ens.sigma_scale.copy_(torch.as_tensor(scale, dtype=torch.float32))
    log.info("sigma calibration on the validation split: scale per band %s", np.round(scale, 3).tolist())
    ev = idx_te if len(idx_te) else idx_va
    with torch.no_grad():
        mean, sigma = ens(torch.as_tensor(x[ev], dtype=torch.float32))
    metrics = evaluate_head(mean.numpy(), sigma.numpy(), mag[ev], mag_err[ev])
    metrics.update({"n_train": int(len(idx_tr)), "n_validation": int(len(idx_va)), "n_test": int(len(idx_te)),
                    "n_members": n_members, "evaluated_on": "test" if len(idx_te) else "validation"})
    return ens, metrics


def features_from(data: dict) -> np.ndarray:
    """Head features float32 [n, S+2] = latents, z, log10(norm) (see :func:`~.head.head_features`)."""
    return np.concatenate([data["latents"], data["z"][:, None], data["log_norm"][:, None]], 1).astype(np.float32)


def train_bundle(data: dict, encoder_bundle, out, *, n_members: int = 5, seed: int = 0, name: str = "catalogpred-ir",
                 version: str = "1", source: str = "", overwrite: bool = False, progress: bool = False):
    """Fit a head ensemble on ``data`` (:func:`read_training_table` layout) and save encoder + head as a bundle.

    The split is by a hash (80/10/10 train/validation/test) of ``data["groups"]`` where given (the object: a
    store's training table groups spectra by the photometry row they matched), else of the ids; the card
    gets the test metrics.
    Returns ``(BundleInfo, metrics)``.
    """
    from ..errors import BundleError
    from .bundle import ModelCard, load_bundle, save_bundle
    from .ood import fit_latent_density

    if int(n_members) < 1:
        raise ConfigError(f"the ensemble needs at least 1 member, not {n_members} (--members)")
    enc = load_bundle(encoder_bundle)
    if enc.info.n_latent != data["latents"].shape[1]:
        raise BundleError(f"the training table has {data['latents'].shape[1]} latents but {encoder_bundle} "
                          f"encodes {enc.info.n_latent}")
    x = features_from(data)
    ok = np.isfinite(x).all(1)
    usable = (_valid(data["mag"], data["mag_err"]) & ok[:, None]).sum(0)
    empty = [b.upper() for b, k in zip(BANDS, usable) if k < MIN_BAND_ROWS]
    if empty:
        raise ConfigError(f"{', '.join(empty)}: fewer than {MIN_BAND_ROWS} usable observations (detections with "
                          f"errors; rows per band: {dict(zip(BANDS, usable.tolist()))}); the head predicts all four "
                          "WISE bands, so each needs observations to learn from")
    # by object where the table knows it (repeat spectra of one object matched to one photometry row): all of
    # an object's spectra fall in one split, so the test metrics are not measured on objects trained on
    split = split_by_hash(data.get("groups") or data["ids"])
    split = np.where(ok, split, 3)  # rows with unusable features take no part
    log.info("training on %d rows (%d train, %d validation, %d test, %d unusable)", len(x), *(int((split == k).sum()) for k in range(4)))
    for k, what, uses in ((1, "validation", "early stopping and the sigma calibration"),
                          (2, "test", "the model card's metrics")):
        if (split == k).sum() < MIN_BAND_ROWS:
            log.warning("only %d %s rows: %s rest on them; train on more spectra", int((split == k).sum()), what, uses)
    ens, metrics = fit_ensemble(x, data["mag"], data["mag_err"], split, n_members=n_members, seed=seed, progress=progress)
    ood = fit_latent_density(data["latents"][split == 0])
    assumption = (" The table's `reg` column is taken to be log10(norm), the feature catalogpred computes from spectra."
                  if data.get("layout") == "reference" else "")
    # a head on a DEMO encoder (seeded random weights) is still a demo: the card keeps saying so
    demo = enc.info.card.kind == "demo"
    card = ModelCard(
        kind="demo" if demo else "trained",
        summary=(f"IR head (deep ensemble of {n_members} heteroscedastic MLPs) trained by `catalogpred train` on top of "
                 f"the encoder {enc.info.model_id}.{assumption}"
                 + (f" The encoder is a DEMO bundle: {enc.info.card.summary}" if demo else "")),
        training_data=(f"{source} ({len(x)} rows, layout {data.get('layout')}; split 80/10/10 by a hash of "
                       + ("the photometry row each spectrum matched (the object)" if data.get("groups")
                          else "the id") + f"; seed {seed})"),
        metrics=metrics,
        limitations="Predictions are calibrated on data like the training set; check ood_score and flags.",
    )
    info = save_bundle(out, enc.encoder, ens, name=name, version=version, grid=enc.info.grid, card=card,
                       overwrite=overwrite, ood=ood)
    return info, metrics


def evaluate_bundle(bundle, data: dict, *, png=None, update_card: bool = True) -> dict:
    """Per-band χ²_N, MAE, bias, 68/95% coverage of a bundle's head on a latent table; optional PNG.

    With ``update_card`` the metrics go into the bundle's card (bundle.json and MODEL_CARD.md).
    """
    import json
    from pathlib import Path

    from ..errors import BundleError
    from .bundle import _card_markdown, load_bundle, read_bundle_info

    model = load_bundle(bundle)
    if model.head is None:
        raise BundleError(f"{bundle} has no IR head to evaluate; train one with `catalogpred train`")
    if data["latents"].shape[1] != model.info.n_latent:
        raise BundleError(f"the table has {data['latents'].shape[1]} latents but {bundle} encodes "
                          f"{model.info.n_latent}: its latents come from another encoder")
    table = data.get("source") or "the table"
    others = [m for m in data.get("model_ids", ()) if m != model.info.model_id]
    if others:
        msg = (f"the rows of {table} were predicted by {', '.join(others)}, not by {bundle} "
               f"({model.info.model_id}): their latents may come from another encoder")
        if update_card:
            raise BundleError(f"{msg}; evaluate on a table predicted by this bundle, or pass --no-update-card "
                              "(update_card=False) to see the metrics without writing them into its card")
        log.warning("%s", msg)
    x = features_from(data)
    ok = np.isfinite(x).all(1)
    if not ok.any() or not (_valid(data["mag"], data["mag_err"]) & ok[:, None]).any():
        raise ConfigError(f"{table} has no row to evaluate on ({len(x)} rows, {int(ok.sum())} with finite latents, "
                          "z and norm; a row also needs an observed W1-W4 magnitude with its error); nothing written")
    with torch.no_grad():
        mean, sigma = model.head(torch.as_tensor(x[ok]))
    mean, sigma = mean.numpy(), sigma.numpy()
    metrics = evaluate_head(mean, sigma, data["mag"][ok], data["mag_err"][ok])
    metrics["n_rows"] = int(ok.sum())
    _warn_if_ab(metrics)
    if data.get("source"):
        metrics["table"] = str(data["source"])
    if png is not None:
        _plot_evaluation(mean, sigma, data["mag"][ok], data["mag_err"][ok], metrics, png)
    if update_card:
        p = Path(bundle) / "bundle.json"
        d = json.loads(p.read_text())
        d["card"]["metrics"] = {**d["card"].get("metrics", {}), "evaluation": metrics}
        p.write_text(json.dumps(d, indent=2) + "\n")
        (Path(bundle) / "MODEL_CARD.md").write_text(_card_markdown(read_bundle_info(bundle)) + "\n## Evaluation\n\n```\n"
                                                   + json.dumps(metrics, indent=1) + "\n```\n")
    return metrics


def _warn_if_ab(metrics: dict) -> None:
    """Warn when the bias (predicted − observed) of every band evaluated is the Vega − AB offset
    (:func:`~catalogpred.tables.warn_if_ab_read_as_vega`)."""
    from ..tables import warn_if_ab_read_as_vega

    warn_if_ab_read_as_vega({b: metrics.get(b, {}).get("bias") for b in BANDS}, "models evaluate")


def _plot_evaluation(mean, sigma, mag, err, metrics, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(14, 6), dpi=100, gridspec_kw={"height_ratios": [3, 1.2]}, sharex="col")
    valid = _valid(mag, err)
    for j, b in enumerate(BANDS):
        v = valid[:, j]
        ax, rx = axes[0, j], axes[1, j]
        ax.scatter(mag[v, j], mean[v, j], s=2, alpha=0.3)
        lo, hi = np.nanpercentile(mag[v, j], [0.5, 99.5]) if v.any() else (0, 1)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        m = metrics.get(b, {})
        ax.set_title(f"{b.upper()}  chi2_N={m.get('chi2_n', np.nan):.2f}  cov68={m.get('coverage_68', np.nan):.2f}")
        ax.set_ylabel("predicted [Vega mag]")
        chi = (mean[v, j] - mag[v, j]) / np.sqrt(sigma[v, j] ** 2 + err[v, j] ** 2)
        rx.scatter(mag[v, j], chi, s=2, alpha=0.3)
        rx.axhline(0, color="k", lw=0.8)
        rx.set_ylim(-5, 5)
        rx.set_xlabel("observed [Vega mag]")
        rx.set_ylabel("chi")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
