"""Import published spender checkpoints into catalogpred bundles, and fetch them when online.

A spender checkpoint is a torch file whose ``["model"]`` entry is a state dict with
``encoder.*`` and ``decoder.*`` keys (sometimes a list of such dicts). Only the encoder is
kept. Legacy layouts are normalised: ``encoder.mlp.mlp.*`` → ``encoder.mlp.*``, and a
first MLP layer 257 wide (redshift appended) loses its last column.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..errors import BundleError
from ..spectra import DESI_GRID, SDSS_GRID
from .bundle import ModelCard, save_bundle
from .encoder import SpectrumEncoder

__all__ = ["encoder_state_from_checkpoint", "import_spender", "fetch_published", "PUBLISHED"]

log = logging.getLogger(__name__)

#: published spender models: name -> (HuggingFace repo, file, survey grid)
PUBLISHED = {
    "sdss_II": ("pmelchior/spender", "spender.sdss.paperII-c273bb69.pt", "sdss"),
    "desi_edr_galaxy": ("pmelchior/spender", "spender.desi-edr.galaxyae-b9bc8d12.pt", "desi"),
}
GRIDS = {"sdss": SDSS_GRID, "desi": DESI_GRID}


def encoder_state_from_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """The encoder's state dict (``encoder.`` stripped, legacy layouts normalised) from a spender checkpoint."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"checkpoint {path} does not exist")
    try:
        struct = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a non-tensor pickle
        if allow_pickle:
            raise BundleError(f"{path}: cannot read as a torch checkpoint ({exc})") from exc
        raise BundleError(f"{path}: not loadable with weights_only=True ({type(exc).__name__}); if you trust the file "
                          "(e.g. downloaded from the spender authors), pass --allow-pickle") from exc
    model = struct.get("model", struct) if isinstance(struct, dict) else struct
    if isinstance(model, (list, tuple)):
        model = model[0]
    if not isinstance(model, dict) or not any(k.startswith("encoder.") for k in model):
        raise BundleError(f"{path}: no encoder.* weights (is this a spender checkpoint with a ['model'] state dict?)")
    state = {}
    for k, v in model.items():
        if not k.startswith("encoder.") or k.startswith("encoder.instrument."):
            continue
        state[k[len("encoder."):].replace("mlp.mlp.", "mlp.")] = v
    w0 = state.get("mlp.0.weight")
    if w0 is not None and w0.shape[1] == 257:
        log.info("%s: legacy 257-wide first MLP layer (z appended): dropping the last column", path.name)
        state["mlp.0.weight"] = w0[:, :256]
    return state


def import_spender(checkpoint: str | os.PathLike, survey: str, out: str | os.PathLike, *, name: str | None = None,
                   version: str = "1", overwrite: bool = False, allow_pickle: bool = False):
    """Write an encoder-only bundle from a spender checkpoint; returns its BundleInfo.

    Parameters
    ----------
    survey : "sdss" | "desi"
        The instrument grid the checkpoint was trained on.
    """
    if survey not in GRIDS:
        raise BundleError(f"survey must be one of {sorted(GRIDS)}, got {survey!r}")
    state = encoder_state_from_checkpoint(checkpoint, allow_pickle=allow_pickle)
    n_latent = state["mlp.9.weight"].shape[0] if "mlp.9.weight" in state else None
    if n_latent is None:
        raise BundleError(f"{checkpoint}: unexpected encoder layout (no mlp.9.weight); keys: {sorted(state)[:6]}…")
    grid = GRIDS[survey]
    encoder = SpectrumEncoder(n_latent=n_latent, n_pix=grid.n_pix)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(f"{checkpoint}: encoder weights do not match the spender architecture "
                          f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    card = ModelCard(kind="published-encoder",
                     summary=f"spender encoder imported from {Path(checkpoint).name} ({survey} grid, {n_latent} latents). "
                             "No IR head yet: train one with `catalogpred train`; predict then writes latents only.",
                     training_data="see the spender papers (Melchior et al. 2023; Liang et al. 2023)")
    return save_bundle(out, encoder.eval(), None, name=name or f"spender-{Path(checkpoint).stem}", version=version,
                       grid=grid, card=card, overwrite=overwrite)


def fetch_published(model: str, dest: str | os.PathLike) -> Path:
    """Download a published spender checkpoint with huggingface_hub (needs a network).

    Raises
    ------
    BundleError
        Offline, or huggingface_hub missing: the message says where to put the file by hand.
    """
    if model not in PUBLISHED:
        raise BundleError(f"unknown model {model!r}; published: {', '.join(PUBLISHED)}")
    repo, filename, _ = PUBLISHED[model]
    dest = Path(dest)
    manual = (f"download https://huggingface.co/{repo}/resolve/main/{filename} on a machine with a network, "
              f"copy it to {dest / filename}, then run `catalogpred models import-spender {dest / filename} "
              f"--survey {PUBLISHED[model][2]} -o BUNDLE`")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise BundleError(f"huggingface_hub is not installed (pip install huggingface_hub); or {manual}") from None
    try:
        path = hf_hub_download(repo_id=repo, filename=filename, local_dir=str(dest))
    except Exception as exc:  # noqa: BLE001 - offline errors come in many types
        raise BundleError(f"could not download {filename} ({type(exc).__name__}); offline? {manual}") from exc
    return Path(path)
