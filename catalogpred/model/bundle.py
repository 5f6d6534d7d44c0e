"""Model bundles: a self-describing directory with weights, grid, latent size, version and card.

Layout::

    model/
      bundle.json      what the bundle is (schema below), validated on load
      encoder.pt       SpectrumEncoder state dict (spender parameter names)
      head.pt          IRHead state dict (absent for an encoder-only bundle)
      MODEL_CARD.md    human-readable card (generated from bundle.json)

``model_id`` = ``<name>-<version>+<sha256 of the weights, 8 hex>``: it goes into every catalog row,
so a catalog always says which weights made it.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import BundleError
from ..spectra import Grid
from .encoder import SpectrumEncoder, features_conv, features_gemm, features_nhwc
from .head import BANDS, build_head, head_features
from .ood import ood_score

log = logging.getLogger(__name__)

__all__ = ["ModelCard", "BundleInfo", "LoadedModel", "save_bundle", "read_bundle_info", "model_card", "load_bundle",
           "cached_model", "encode", "infer", "BUNDLE_SCHEMA_VERSION"]

BUNDLE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    """What a model is, how it was made, what it is good for."""

    kind: str  # "demo" | "published-encoder" | "trained"
    summary: str
    training_data: str = ""
    metrics: dict = field(default_factory=dict)
    limitations: str = ""
    references: tuple = ("Melchior et al. 2023 (spender)", "Liang et al. 2023", "Jespersen et al. 2025 (arXiv 2503.03816)")


@dataclass(frozen=True)
class BundleInfo:
    """Contents of ``bundle.json``."""

    name: str
    version: str
    model_id: str
    grid: Grid
    n_latent: int
    head_config: dict | None
    card: ModelCard
    created: str
    schema_version: int = BUNDLE_SCHEMA_VERSION
    ood: dict | None = None  #: training-latent density for ood_score (see model/ood.py)
    features: str = "latents, z, log10(norm / 1e-17 erg/s/cm2/Angstrom)"
    bands: tuple = BANDS
    units: dict = field(default_factory=lambda: {
        "input": "flux / norm on the grid (norm in 1e-17 erg/s/cm2/Angstrom)",
        "output": "WISE W1-W4 Vega magnitudes (AllWISE w?mpro system) and 1-sigma errors in mag",
    })

    def to_json(self) -> dict:
        d = asdict(self)
        d["grid"] = self.grid.to_dict()
        return d


@dataclass
class LoadedModel:
    info: BundleInfo
    encoder: SpectrumEncoder
    head: "torch.nn.Module | None"  # IRHead or HeadEnsemble: forward(x) -> (mean, sigma)
    device: str = "cpu"


def _sha256(paths, grid: Grid | None = None) -> str:
    """SHA-256 of the weight files and, for models of a grid other than SDSS's, the grid's name: the same
    weights read as a DESI-grid encoder are another model (ids of SDSS-grid bundles are as before)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    if grid is not None and grid.name != "sdss":
        h.update(f"grid:{grid.name}".encode())
    return h.hexdigest()


def save_bundle(path: str | os.PathLike, encoder: SpectrumEncoder, head, *, name: str, version: str,
                grid: Grid, card: ModelCard, overwrite: bool = False, ood: dict | None = None) -> BundleInfo:
    """Write a bundle directory; returns its :class:`BundleInfo`.

    ``head`` is an :class:`~.head.IRHead`, a :class:`~.head.HeadEnsemble` or None (encoder only);
    ``ood`` the training-latent density from :func:`~.ood.fit_latent_density`.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise BundleError(f"{path} exists and is not empty; pass overwrite=True (CLI: --overwrite)")
    if encoder.n_pix != grid.n_pix:
        raise BundleError(f"encoder expects {encoder.n_pix} pixels but grid {grid.name} has {grid.n_pix}")
    path.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), path / "encoder.pt")
    weights = [path / "encoder.pt"]
    if head is not None:
        torch.save(head.state_dict(), path / "head.pt")
        weights.append(path / "head.pt")
    elif (path / "head.pt").exists():
        (path / "head.pt").unlink()
    model_id = f"{name}-{version}+{_sha256(weights, grid)[:8]}"
    info = BundleInfo(name=name, version=version, model_id=model_id, grid=grid, n_latent=encoder.n_latent,
                      head_config=head.config() if head is not None else None, card=card, ood=ood,
                      created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    (path / "bundle.json").write_text(json.dumps(info.to_json(), indent=2) + "\n")
    (path / "MODEL_CARD.md").write_text(_card_markdown(info))
    return info


def _card_markdown(info: BundleInfo) -> str:
    c = info.card
    lines = [f"# Model card: {info.name} {info.version}", "", f"- model_id: `{info.model_id}`", f"- kind: **{c.kind}**",
             f"- grid: {info.grid.name} ({info.grid.n_pix} px, {info.grid.wave[0]:.1f}-{info.grid.wave[-1]:.1f} Angstrom)",
             f"- latents: {info.n_latent}",
             f"- head: {_head_text(info.head_config)}",
             f"- out-of-distribution score: {'Mahalanobis distance^2 in latent space, flag above ' + format(info.ood['threshold'], '.1f') + ' (chi2 quantile ' + str(info.ood['quantile']) + ')' if info.ood else 'none'}",
             f"- outputs: {info.units['output']}", "", "## Summary", "", c.summary, ""]
    if c.training_data:
        lines += ["## Training data", "", c.training_data, ""]
    if c.metrics:
        split = c.metrics.get("evaluated_on", "validation")
        lines += [f"## Metrics ({split} split; chi = (pred - obs)/sqrt(sigma_pred^2 + sigma_obs^2), chi2_N = mean chi^2)", "",
                  "| band | n | chi2_N | MAE | bias | cov68 | cov95 |", "|---|---|---|---|---|---|---|"]
        for b in info.bands:
            m = c.metrics.get(b, {})
            if m.get("n"):
                lines.append(f"| {b} | {m['n']} | {m['chi2_n']:.2f} | {m['mae']:.3f} | {m['bias']:+.3f} | "
                             f"{m['coverage_68']:.2f} | {m['coverage_95']:.2f} |")
        lines.append("")
    if c.limitations:
        lines += ["## Limitations", "", c.limitations, ""]
    lines += ["## References", ""] + [f"- {r}" for r in c.references] + [""]
    return "\n".join(lines)


def _head_text(cfg: dict | None) -> str:
    if not cfg:
        return "none (encoder only: the catalog carries latents, magnitudes are null)"
    members = cfg.get("n_members", 1)
    return (f"heteroscedastic MLP {cfg['n_in']}->{'->'.join(map(str, cfg['n_hidden']))}->2x{cfg['n_bands']}"
            + (f", deep ensemble of {members}" if members > 1 else ""))


def model_card(path: str | os.PathLike) -> str:
    """A bundle's model card as Markdown: its ``MODEL_CARD.md`` (with the section ``models evaluate`` adds),
    or, where that file is missing, the card made from ``bundle.json``. Raises BundleError for a non-bundle."""
    info = read_bundle_info(path)
    card = Path(path) / "MODEL_CARD.md"
    return card.read_text() if card.exists() else _card_markdown(info)


def read_bundle_info(path: str | os.PathLike) -> BundleInfo:
    """Read and validate ``bundle.json``."""
    path = Path(path)
    f = path / "bundle.json"
    if not f.exists():
        raise BundleError(f"{path} is not a model bundle (no bundle.json); build one with `catalogpred demo` "
                          "or import a spender checkpoint")
    try:
        d = json.loads(f.read_text())
        if d.get("schema_version") != BUNDLE_SCHEMA_VERSION:
            raise BundleError(f"{f}: schema_version {d.get('schema_version')} is not {BUNDLE_SCHEMA_VERSION}")
        card = ModelCard(**{**d["card"], "references": tuple(d["card"].get("references", ()))})
        return BundleInfo(name=d["name"], version=d["version"], model_id=d["model_id"], grid=Grid.from_dict(d["grid"]),
                          n_latent=int(d["n_latent"]), head_config=d.get("head_config"), card=card, created=d["created"],
                          schema_version=d["schema_version"], bands=tuple(d.get("bands", BANDS)), units=d.get("units", {}),
                          ood=d.get("ood"))
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{f} is malformed: {exc}") from exc


def load_bundle(path: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Load a bundle's weights (eval mode) onto ``device``."""
    path = Path(path)
    info = read_bundle_info(path)
    encoder = SpectrumEncoder(n_latent=info.n_latent, n_pix=info.grid.n_pix)
    try:
        encoder.load_state_dict(torch.load(path / "encoder.pt", map_location="cpu", weights_only=True))
        head = None
        if info.head_config:
            head = build_head(info.head_config)
            head.load_state_dict(torch.load(path / "head.pt", map_location="cpu", weights_only=True))
    except (OSError, RuntimeError) as exc:
        raise BundleError(f"{path}: cannot load weights ({exc})") from exc
    encoder.to(device).eval()
    if head is not None:
        head.to(device).eval()
    return LoadedModel(info=info, encoder=encoder, head=head, device=device)


@functools.lru_cache(maxsize=4)
def _cached(path: str, mtime: float, device: str) -> LoadedModel:
    return load_bundle(path, device)


def cached_model(path: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """Load a bundle once per process (keyed on path and bundle.json mtime)."""
    p = os.path.abspath(str(path))
    return _cached(p, os.path.getmtime(os.path.join(p, "bundle.json")), device)


#: encoder implementations of the same function: ``conv`` = the module's forward (cuDNN/oneDNN 1-D
#: convolutions); ``gemm`` = :func:`~catalogpred.model.encoder.features_gemm` (channels-last, each
#: convolution one matrix product); ``nhwc`` = :func:`~catalogpred.model.encoder.features_nhwc` (2-D
#: convolutions in channels-last format, cuDNN's tensor-core kernels). ``auto`` = ``conv`` on CPUs; on
#: GPUs the fastest, timed once per process, shape and precision. ``CATALOGPRED_ENCODER_IMPL`` overrides ``auto``.
_FEATURES = {"conv": features_conv, "gemm": features_gemm, "nhwc": features_nhwc}
ENCODER_IMPLS = ("auto", *_FEATURES)
_CHOSEN: dict = {}
_CHOOSE_LOCK = threading.Lock()


def _forward(encoder: SpectrumEncoder, y: torch.Tensor, impl: str, precision: str) -> torch.Tensor:
    """Latents of one batch. fp32: float32 throughout (``conv`` is the module's own forward). bf16: the
    encoder's mixed precision (conv2 and conv3 in bfloat16, the rest float32; see model.encoder)."""
    return encoder.mlp(_FEATURES[impl](encoder, y, precision == "bf16"))


def _choose_impl(encoder: SpectrumEncoder, x: torch.Tensor, batch_size: int, precision: str, impl: str) -> str:
    impl = os.environ.get("CATALOGPRED_ENCODER_IMPL", impl) if impl == "auto" else impl
    if impl not in ENCODER_IMPLS:
        raise BundleError(f"encoder implementation must be one of {ENCODER_IMPLS}, not {impl!r}")
    if impl != "auto":
        return impl
    if x.device.type != "cuda":
        return "conv"
    b = min(batch_size, x.shape[0])
    key = (id(encoder), x.device.index, encoder.n_pix, b, precision)
    with _CHOOSE_LOCK:  # one timing at a time: blocks sharing a GPU would disturb each other's clocks
        if key not in _CHOSEN:
            times = {}
            for cand in _FEATURES:
                try:
                    _forward(encoder, x[:b], cand, precision)  # warm-up (cuDNN picks its kernels)
                    torch.cuda.synchronize(x.device)
                    t0 = time.perf_counter()
                    for _ in range(3):
                        _forward(encoder, x[:b], cand, precision)
                    torch.cuda.synchronize(x.device)
                    times[cand] = time.perf_counter() - t0
                except torch.OutOfMemoryError:
                    times[cand] = float("inf")
            _CHOSEN[key] = min(times, key=times.get)
            log.info("encoder on %s, batch %d, %s: %s (%s)", x.device, b, precision, _CHOSEN[key],
                     ", ".join(f"{k} {3 * b / v:,.0f}/s" for k, v in times.items()))
        return _CHOSEN[key]


#: ``torch.compile`` (inductor) of one encoder implementation, per encoder, implementation, precision and
#: device: compiled once per process for one batch shape (the last batch of a block is padded to it).
#: Measured: 2.6-2.8x the eager bf16 encoder on an H200 after 5-11 s of compilation (bench_gpu); on a
#: 2-core CPU 1.3-1.7x the eager fp32 reference with 2 threads (bench_model) and 1.1-1.3x with 1 thread,
#: after 5-22 s. ``None`` marks a compilation that failed here (no C++ compiler, no Triton): eager instead.
_COMPILED: dict = {}
#: implementation that is compiled when ``impl="auto"``: channels-last 2-D convolutions were the fastest
#: compiled candidate on both the H200 and the CPU (measured against ``conv`` and ``gemm``)
COMPILE_IMPL = "nhwc"


def _compiled_forward(encoder: SpectrumEncoder, x: torch.Tensor, batch_size: int, precision: str, impl: str):
    """A compiled ``_forward`` for batches of exactly ``batch_size`` rows, or None when compilation fails
    here (logged once; the caller runs eager). The first call compiles, under a lock:
    blocks that share a worker wait for it instead of compiling the same graph twice."""
    impl = COMPILE_IMPL if impl == "auto" else impl
    key = (id(encoder), impl, precision, str(x.device), batch_size)
    with _CHOOSE_LOCK:
        if key not in _COMPILED:
            fn = torch.compile(functools.partial(_forward, encoder, impl=impl, precision=precision), dynamic=False)
            t0 = time.perf_counter()
            try:
                warm = x[:1].expand(batch_size, -1).contiguous()
                fn(warm)
                if x.device.type == "cuda":
                    torch.cuda.synchronize(x.device)
            except Exception as exc:  # noqa: BLE001 - an optimisation never fails a run
                log.warning("torch.compile of the %s encoder failed on %s (%s: %s); running it eagerly", impl,
                            x.device, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                fn = None
            else:
                log.info("encoder %s %s compiled for batch %d on %s in %.1f s", impl, precision, batch_size,
                         x.device, time.perf_counter() - t0)
            _COMPILED[key] = fn
        return _COMPILED[key]


def _padded(y: torch.Tensor, rows: int) -> torch.Tensor:
    """``y`` [m, L] with its last row repeated up to ``rows`` rows (a finite, realistic pad: rows are independent)."""
    return y if len(y) == rows else torch.cat([y, y[-1:].expand(rows - len(y), -1)])


def encode(encoder: SpectrumEncoder, flux: np.ndarray, *, batch_size: int = 256, precision: str = "fp32",
           device: str = "cpu", impl: str = "auto", compile: bool = False) -> np.ndarray:
    """Latents float32 [n, S] of normalised spectra ``flux`` float32 [n, n_pix] (see :func:`infer`;
    ``impl`` is one of :data:`ENCODER_IMPLS`)."""
    return _encode_on_device(encoder, flux, batch_size=batch_size, precision=precision, device=device,
                             impl=impl, compile=compile).cpu().numpy()


def _encode_on_device(encoder: SpectrumEncoder, flux: np.ndarray, *, batch_size: int, precision: str,
                      device: str, impl: str = "auto", compile: bool = False,
                      after_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Latents as a float32 tensor on ``device``: the block moves there once (one host-to-device copy
    on CUDA; on the CPU the batches are views of ``flux``), then batches are slices of it. With
    ``compile`` the batches go through :func:`_compiled_forward` (the last one padded to ``batch_size``).
    ``after_batch`` is called after each batch, its activations freed (see :func:`infer`)."""
    if precision not in ("fp32", "bf16"):
        raise BundleError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if flux.ndim != 2 or flux.shape[1] != encoder.n_pix:
        raise BundleError(f"flux has shape {flux.shape}, the encoder expects [n, {encoder.n_pix}]")
    dev_type = torch.device(device).type
    if dev_type == "cuda":
        # fp32 means IEEE fp32 on GPUs too (cuDNN would use TF32 for convolutions by default, ~1e-3 relative
        # error); batches have a fixed size, so let cuDNN pick its fastest kernels once per shape
        torch.backends.cudnn.benchmark = True
        if precision == "fp32":
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        # the block becomes an inference tensor, like the compiled graph's warm-up batch: a batch that is a
        # view of a tensor made outside inference mode carries autograd dispatch keys, and torch.compile
        # would compile the graph again for it (seconds per worker process, on its first full block)
        x = torch.from_numpy(np.ascontiguousarray(flux, dtype=np.float32)).to(device)
        out = torch.empty((flux.shape[0], encoder.n_latent), dtype=torch.float32, device=x.device)
        if not flux.shape[0]:
            return out
        fn = _compiled_forward(encoder, x, batch_size, precision, impl) if compile else None
        if fn is None:  # eager (also where compilation failed)
            impl = _choose_impl(encoder, x, batch_size, precision, impl)
        for lo in range(0, flux.shape[0], batch_size):
            y = x[lo:lo + batch_size]
            s = fn(_padded(y, batch_size))[:len(y)] if fn is not None else _forward(encoder, y, impl, precision)
            out[lo:lo + len(s)] = s.float()
            del s
            if after_batch is not None:
                after_batch()
    return out


def infer(model: LoadedModel, flux: np.ndarray, z: np.ndarray, norm: np.ndarray, *, batch_size: int = 256,
          precision: str = "fp32", with_ood: bool = False, compile: bool = False,
          after_batch: Callable[[], None] | None = None):
    """Run encoder and head on normalised spectra.

    Parameters
    ----------
    flux : float32 [n, n_pix]
        Flux / norm on the bundle's grid.
    z : float [n]
    norm : float [n]
        1e-17 erg/s/cm²/Å (> 0).
    precision : "fp32" | "bf16"
        bf16 runs the encoder's conv2 and conv3 (99.5 % of its FLOPs) in bfloat16 (CPU or CUDA) and
        everything else, the head included, in float32 (see :mod:`catalogpred.model.encoder`).
    compile : bool
        Run the encoder through ``torch.compile`` (compiled once per process and batch size; the
        same latents to float32 rounding). Falls back to eager, with a warning, where it cannot compile.
    after_batch : callable, optional
        Called with no arguments after each encoder batch, once its activations are freed: a CPU worker
        hands the freed memory back to the OS there (:func:`catalogpred.tasks.infer_block`).

    Returns
    -------
    latents : float32 [n, S]; mean, sigma : float32 [n, 4] Vega mag (None without a head);
    with ``with_ood`` also ood : float32 [n] (None when the bundle has no latent density)
    """
    if flux.ndim != 2 or flux.shape[1] != model.info.grid.n_pix:
        raise BundleError(f"flux has shape {flux.shape}, the model expects [n, {model.info.grid.n_pix}] "
                          f"({model.info.grid.name} grid)")
    lat_dev = _encode_on_device(model.encoder, flux, batch_size=batch_size, precision=precision, device=model.device,
                               compile=compile, after_batch=after_batch)
    lat = lat_dev.cpu().numpy()
    ood = ood_score(lat, model.info.ood) if (with_ood and model.info.ood) else None
    if model.head is None:
        return (lat, None, None, ood) if with_ood else (lat, None, None)
    with torch.inference_mode():
        x = head_features(lat_dev,  # latents stay on the device for the head
                          torch.as_tensor(np.array(z, np.float32), device=model.device),
                          torch.as_tensor(np.array(norm, np.float32), device=model.device))
        mean, sigma = model.head(x)
    if with_ood:
        return lat, mean.cpu().numpy(), sigma.cpu().numpy(), ood
    return lat, mean.cpu().numpy(), sigma.cpu().numpy()
