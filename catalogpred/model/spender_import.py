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
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip file, or a pickle (legacy)
        raise BundleError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle: it starts with "
                          f"{head!r}); is it an HTML error page or a truncated download?")
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


#: HTTP statuses worth another try (the server or a proxy is busy); any other error is final at once
TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)
#: seconds to wait before each further try after a transient HTTP error: three tries, at most 2 s of waiting
RETRY_WAITS = (0.5, 1.5)


def fetch_published(model: str, dest: str | os.PathLike, *, endpoint: str | None = None,
                    timeout: float = 10.0) -> Path:
    """Download a published spender checkpoint from the HuggingFace Hub (needs a network) to ``dest``.

    ``endpoint``: the Hub (default ``$HF_ENDPOINT``, as huggingface_hub reads it, else https://huggingface.co).
    The file is written under a temporary name and renamed when complete; one already in ``dest`` is kept.
    Without a network it fails at once: one try, no retries for a host that cannot be resolved or reached
    (or with ``$HF_HUB_OFFLINE`` set); only a transient HTTP status (:data:`TRANSIENT_HTTP`) is tried again,
    after :data:`RETRY_WAITS`. ``timeout``: seconds to connect, and the most a read may stall.

    Raises
    ------
    BundleError
        Unknown model, or the download failed: a one-line message that says why and where to put the file by hand.
    """
    if model not in PUBLISHED:
        raise BundleError(f"unknown model {model!r}; published: {', '.join(PUBLISHED)}")
    repo, filename, survey = PUBLISHED[model]
    dest = Path(dest)
    target = dest / filename
    hub = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    url = f"{hub}/{repo}/resolve/main/{filename}"
    manual = (f"download it on a machine with a network, copy it to {target}, then run "
              f"`catalogpred models import-spender {target} --survey {survey} -o BUNDLE`")
    if target.is_file():
        log.info("%s is already there; not downloaded again", target)
        return target
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise BundleError(f"HF_HUB_OFFLINE is set, so {url} is not downloaded; {manual}")
    dest.mkdir(parents=True, exist_ok=True)
    _download(url, target, timeout, manual)
    return target


def _download(url: str, target: Path, timeout: float, manual: str) -> None:
    """``url`` to ``target`` (via ``target``.part): one try, more only after a transient HTTP status."""
    import shutil
    import time
    import urllib.error
    import urllib.request

    part = target.with_name(target.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "catalogpred"})
    for wait in (*RETRY_WAITS, None):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as fh:
                shutil.copyfileobj(response, fh, 1 << 20)
            os.replace(part, target)
            return
        except urllib.error.HTTPError as exc:
            if exc.code in TRANSIENT_HTTP and wait is not None:
                log.info("HTTP %d from %s; trying again in %g s", exc.code, url, wait)
                time.sleep(wait)
                continue
            why = f"HTTP {exc.code} {exc.reason}"
        except urllib.error.URLError as exc:  # name not resolved, refused, no route: offline, no point in retrying
            why = str(exc.reason)
        except OSError as exc:  # a connection that stalled or broke mid-file
            why = str(exc) or type(exc).__name__
        finally:
            part.unlink(missing_ok=True)
        raise BundleError(f"could not download {url} ({why}); offline? {manual}")
