"""Encoder inference speed: catalogpred's fp32, compiled and bf16 paths against the reference eager fp32 pass.

    python bench/bench_model.py            # 1,024 SDSS-grid spectra per measurement, 3 repeats
    python bench/bench_model.py --quick    # 256 spectra, 1 repeat

Reference (issue 4): the straightforward fp32 eager forward pass of the same architecture, batch 256,
``torch.inference_mode`` — spender 0.3's own ``SpectrumEncoder`` when the package is installed (the
test extra installs it), else catalogpred's module in plain eager mode. Same weights, same inputs,
same thread count, measured in the same run (interleaved, best of the repeats).

Reported: spectra/s, ratio to the reference, latent max relative error against the reference,
predicted-magnitude difference bf16 vs fp32 (through a head), and achieved GFLOP/s against a nominal
peak of this CPU (cores × clock × 32 fp32 FLOP/cycle for AVX2 with two FMA units; a rough upper bound).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import format_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from catalogpred.model.bundle import encode  # noqa: E402
from catalogpred.model.encoder import SpectrumEncoder, encoder_flops  # noqa: E402
from catalogpred.model.head import IRHead, head_features  # noqa: E402
from catalogpred.spectra import SDSS_GRID  # noqa: E402

BATCH = 256


def _reference(ours: SpectrumEncoder):
    try:
        import spender
        from spender.instrument import Instrument

        ref = spender.SpectrumEncoder(Instrument(torch.tensor(SDSS_GRID.wave, dtype=torch.float32)), ours.n_latent)
        ref.load_state_dict(ours.state_dict(), strict=False)
        return ref.eval(), "spender 0.3 SpectrumEncoder, eager fp32"
    except ImportError:
        ref = SpectrumEncoder(n_latent=ours.n_latent, n_pix=ours.n_pix)
        ref.load_state_dict(ours.state_dict())
        return ref.eval(), "catalogpred SpectrumEncoder, plain eager fp32 (spender not installed)"


def _ref_encode(model, y):
    out = []
    with torch.inference_mode():
        for lo in range(0, len(y), BATCH):
            out.append(model(torch.from_numpy(y[lo:lo + BATCH])).numpy())
    return np.concatenate(out)


def _nominal_peak_gflops(threads: int) -> tuple[float, str]:
    mhz = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("cpu mhz"):
                mhz = float(line.split(":")[1])
                break
    except OSError:
        pass
    mhz = mhz or 2500.0
    per_cycle, isa = (64, "AVX-512") if "avx512f" in _cpu_flags() else (32, "AVX2")
    return (threads * mhz / 1e3 * per_cycle,
            f"{threads} cores x {mhz / 1e3:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({isa}, 2 FMA units)")


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def _has_native_bf16() -> bool:
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def run(quick: bool = False) -> list[dict]:
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = 256 if quick else 1024
    repeats = 1 if quick else 3
    rng = np.random.default_rng(0)
    # spectrum-like inputs: smooth continuum + lines + noise, normalised to ~1
    lam = SDSS_GRID.wave
    y = (1 + 0.3 * np.sin(lam[None, :] / rng.uniform(300, 900, (n, 1))) + rng.normal(0, 0.1, (n, lam.size))).astype(np.float32)
    ours = SpectrumEncoder().eval()
    ref, ref_name = _reference(ours)
    head = IRHead().eval()
    native_bf16 = _has_native_bf16()
    # bf16 autocast is emulated (slow) on CPUs without AVX512-BF16/AMX: there it is timed once, on fewer
    # spectra; with bf16 arithmetic like the others (all spectra, interleaved, best of the repeats)
    n16 = n if native_bf16 else (32 if quick else 128)
    _ref_encode(ref, y[:BATCH]), encode(ours, y[:BATCH]), encode(ours, y[:8], precision="bf16")  # warm up
    times = {"ref": [], "fp32": [], "bf16": []}
    for i in range(repeats):
        t = time.perf_counter(); lat_ref = _ref_encode(ref, y); times["ref"].append(time.perf_counter() - t)
        t = time.perf_counter(); lat32 = encode(ours, y, batch_size=BATCH); times["fp32"].append(time.perf_counter() - t)
        if native_bf16 or i == 0:
            t = time.perf_counter()
            lat16 = encode(ours, y[:n16], batch_size=BATCH, precision="bf16")
            times["bf16"].append(time.perf_counter() - t)
    # torch.compile of the encoder (what `predict --compile` runs): compiled once, timed like fp32
    t = time.perf_counter(); encode(ours, y[:BATCH], batch_size=BATCH, compile=True); t_compile = time.perf_counter() - t
    times["compiled"] = []
    for _ in range(repeats):
        t = time.perf_counter(); lat_c = encode(ours, y, batch_size=BATCH, compile=True); times["compiled"].append(time.perf_counter() - t)
    errc = float(np.max(np.abs(lat_c - lat_ref)) / np.max(np.abs(lat_ref)))
    # compiled bf16: what predict --precision bf16 runs at catalog scale (--compile auto: 50,000 spectra per CPU
    # worker); only where the CPU has bf16 arithmetic (emulated, it would take minutes)
    if native_bf16:
        t = time.perf_counter(); encode(ours, y[:BATCH], batch_size=BATCH, precision="bf16", compile=True)
        t_compile16 = time.perf_counter() - t
        times["compiled_bf16"] = []
        for _ in range(repeats):
            t = time.perf_counter()
            lat_c16 = encode(ours, y, batch_size=BATCH, precision="bf16", compile=True)
            times["compiled_bf16"].append(time.perf_counter() - t)
        errc16 = float(np.max(np.abs(lat_c16 - lat_ref)) / np.max(np.abs(lat_ref)))
    rate = {k: (n16 if k == "bf16" else n) / min(v) for k, v in times.items()}
    lat16_ref, lat32_16 = lat_ref[:n16], lat32[:n16]
    scale = np.max(np.abs(lat_ref))
    err32 = float(np.max(np.abs(lat32 - lat_ref)) / scale)
    err16 = float(np.max(np.abs(lat16 - lat16_ref)) / scale)
    z = torch.full((n16,), 0.1)
    norm = torch.full((n16,), 10.0)
    # the head sees its inputs standardised as training leaves them (a random encoder's latents are small:
    # unscaled, every spectrum got the same magnitudes and |dmag| was 0 by construction), outputs in 1-mag units
    x32 = head_features(torch.from_numpy(lat32_16), z, norm)
    head.x_mean.copy_(x32.mean(0))
    head.x_std.copy_(x32.std(0).clamp_min(1e-6))
    head.y_std.fill_(1.0)
    with torch.inference_mode():
        m32, _ = head(head_features(torch.from_numpy(lat32_16), z, norm))
        m16, _ = head(head_features(torch.from_numpy(lat16), z, norm))
    dmag = float((m32 - m16).abs().max())
    spread = float(m32.std(0).min())  # how much the magnitudes vary across the spectra (the check's scale)
    flops = encoder_flops(SDSS_GRID.n_pix)
    peak, peak_note = _nominal_peak_gflops(threads)
    rows = [
        {"name": "encoder reference (eager fp32)", "value": rate["ref"], "unit": "spectra/s", "baseline": None,
         "ratio": None, "target": None, "note": ref_name},
        {"name": "encoder fp32 (catalogpred)", "value": rate["fp32"], "unit": "spectra/s", "baseline": rate["ref"],
         "ratio": rate["fp32"] / rate["ref"], "target": ">= 0.95x (same computation), latents = ref to 1e-5",
         "pass": (quick or rate["fp32"] / rate["ref"] >= 0.95) and err32 <= 1e-5,
         "note": f"latent max rel err {err32:.1e}; 0.95: the two run the same convolutions, timing noise allowed"},
        {"name": "encoder fp32 torch.compile (predict --compile)", "value": rate["compiled"], "unit": "spectra/s",
         "baseline": rate["ref"], "ratio": rate["compiled"] / rate["ref"], "target": "latents = ref to 1e-5",
         "pass": errc <= 1e-5, "note": f"latent max rel err {errc:.1e}; compiled in {t_compile:.0f} s (not timed)"},
        # the speed target (>= 1.8x, issue 4) is for hardware with bf16 arithmetic (GPUs, AVX512-BF16/AMX CPUs),
        # and on a CPU for the compiled path that predict --precision bf16 runs at catalog scale. The eager row
        # (predict below 50,000 spectra per worker) checks the accuracy and shows its ratio: on a 2-core AMX
        # CPU its fp32 InstanceNorm/PReLU/pooling passes, not the bf16 convolutions, bound it (~1.5x)
        {"name": "encoder bf16 (mixed precision, eager)", "value": rate["bf16"], "unit": "spectra/s",
         "baseline": rate["ref"], "ratio": rate["bf16"] / rate["ref"], "target": "err <= 1%, dmag <= 0.02",
         "pass": err16 <= 0.01 and dmag <= 0.02,
         "note": f"latent max rel err {err16:.2%}, max |dmag| {dmag:.3f} (random head, inputs standardised; "
                 f"magnitudes vary by {spread:.2f} mag across spectra); {n16} spectra; "
                 f"native bf16 on this CPU: {native_bf16}"},
        {"name": "encoder bf16 torch.compile (predict --precision bf16 at scale)", "unit": "spectra/s",
         "baseline": rate["ref"], "target": ">= 1.8x, err <= 1%",
         **({"value": rate["compiled_bf16"], "ratio": rate["compiled_bf16"] / rate["ref"],
             "pass": (quick or rate["compiled_bf16"] / rate["ref"] >= 1.8) and errc16 <= 0.01,
             "note": f"latent max rel err {errc16:.2%}; compiled in {t_compile16:.0f} s (not timed)"}
            if native_bf16 else
            {"value": None, "ratio": None, "pass": None,
             "note": "not run: this CPU has no bf16 arithmetic (torch would emulate it)"})},
    ]
    if quick:  # one repeat on a few spectra: the accuracy is judged, the speed is not
        for r in rows:
            if r.get("pass") is not None and re.search(r"\dx\b", r.get("target") or ""):
                r["note"] = (r.get("note") or "") + "; quick run: speed not judged"
    rows.append(
        {"name": "achieved fp32 GFLOP/s", "value": rate["fp32"] * flops / 1e9, "unit": "GFLOP/s", "baseline": peak,
         "ratio": rate["fp32"] * flops / 1e9 / peak, "target": None, "note": f"nominal peak: {peak_note}"})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke run")
    args = p.parse_args(argv)
    print(format_rows(run(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
