"""``catalogpred demo``: the whole path on mock SDSS, DESI and PFS surveys, on the local Dask cluster.

1. write mock surveys of format-faithful files (SDSS ``spec-*.fits`` with a few bad inputs, DESI coadds
   with redrock files, PFS pfsCoadd/pfsObject with pfsCoZCandidates) and AllWISE-like photometry
   tables (:mod:`.mock`, :mod:`.mock_survey`, :mod:`.mock_pfs`); ``--surveys`` picks some;
2. ingest them into one ``store.zarr``;
3. build **DEMO** model bundles: seeded, untrained spender-architecture encoders with IR heads fitted
   in seconds on the mock photometry, ``model/`` (SDSS grid) and ``model-desi/`` (DESI grid, for DESI
   and PFS); nothing here is a published model;
4. predict into a HATS catalog, print the summary and a cone query, save a colour–colour plot.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import store
from .errors import ConfigError
from .spectra import SDSS_GRID

__all__ = ["run_demo", "build_demo_bundle", "plot_colour_colour"]

log = logging.getLogger(__name__)

DEMO_BAD_INPUTS = 7
#: mock surveys of the demo (SDSS is always made: the demo trains its head on it)
DEMO_SURVEYS = ("sdss", "desi", "pfs")
#: the fewest SDSS spectra the demo's head can be trained on (``catalogpred.cli.DEMO_MIN_SPECTRA`` says it too)
MIN_SPECTRA = 10
#: the file that marks a directory as `catalogpred demo` output, whose subdirectories a re-run may replace
DEMO_MARKER = ".catalogpred-demo"
N_TRAIN_MAX = 1000


def _made_by_demo(out: Path) -> bool:
    """Whether ``out`` is `catalogpred demo` output: its marker, or (before there was one) its DEMO bundle."""
    from .errors import BundleError
    from .model.bundle import read_bundle_info

    if (out / DEMO_MARKER).exists():
        return True
    try:
        return read_bundle_info(out / "model").card.kind == "demo"
    except BundleError:
        return False


def build_demo_bundle(store_path, photometry_path, out, *, client, seed: int = 42, n_train_max: int = N_TRAIN_MAX):
    """Seeded encoder + head fitted on mock photometry; returns the :class:`~.model.bundle.BundleInfo`.

    The photometry table is matched to the store on (plate, mjd, fiberid), like a
    real SDSS × AllWISE match. The encoder is first saved as an encoder-only bundle
    so the workers compute the training latents in parallel (:func:`.tasks.encode_rows`).
    """
    import torch

    from .model.bundle import ModelCard, save_bundle
    from .model.encoder import SpectrumEncoder
    from .model.head import head_features
    from .model.train import fit_head
    from .tasks import encode_rows

    torch.manual_seed(seed)
    encoder = SpectrumEncoder(n_latent=6, n_pix=SDSS_GRID.n_pix).eval()
    summary = ("DEMO bundle made by `catalogpred demo`. The encoder has the spender architecture but SEEDED RANDOM "
               f"weights (torch seed {seed}); the IR head was fitted in seconds on a MOCK survey. It is not the "
               "published spender model and its predictions have no scientific value on real data.")
    save_bundle(out, encoder, None, name="catalogpred-demo-encoder", version="1", grid=SDSS_GRID, overwrite=True,
                card=ModelCard(kind="demo", summary=summary))
    meta = store.read_meta(store_path, "sdss", columns=["plate", "mjd", "fiberid", "z", "norm", "status"])
    meta = meta.filter(pa.compute.equal(meta.column("status"), store.RowStatus.OK))
    phot = pq.read_table(photometry_path).to_pandas()
    m = meta.to_pandas().merge(phot, on=["plate", "mjd", "fiberid"], how="inner", suffixes=("", "_phot"))
    rng = np.random.default_rng(seed)
    m = m.iloc[np.sort(rng.permutation(len(m))[:n_train_max])]
    t0 = time.perf_counter()
    rows = m["row"].to_numpy()
    chunks = np.array_split(rows, max(1, len(client.scheduler_info()["workers"])))
    futures = [client.submit(encode_rows, str(store_path), "sdss", c, str(Path(out).resolve()), pure=False)
               for c in chunks if len(c)]
    latents = np.concatenate(client.gather(futures))
    x = head_features(torch.as_tensor(latents), torch.tensor(m["z"].to_numpy(), dtype=torch.float32),
                      torch.tensor(m["norm"].to_numpy(), dtype=torch.float32)).numpy()
    mags = m[[f"w{i}mpro" for i in range(1, 5)]].to_numpy(np.float64)
    errs = m[[f"w{i}sigmpro" for i in range(1, 5)]].to_numpy(np.float64)
    head, metrics = fit_head(x, mags, errs, seed=seed)
    log.info("demo head fitted on %d mock spectra in %.1f s", len(m), time.perf_counter() - t0)
    card = ModelCard(
        kind="demo",
        summary=summary,
        training_data=f"{len(m)} mock SDSS spectra matched to mock AllWISE photometry ({photometry_path}).",
        metrics=metrics,
        limitations="Demonstration only. Use `catalogpred models import-spender` (published encoder) and "
                    "`catalogpred train` (real photometry) for science.",
    )
    return save_bundle(out, encoder, head, name="catalogpred-demo", version="1", grid=SDSS_GRID, card=card, overwrite=True)


def plot_colour_colour(catalog_path, png_path, photometry_path=None) -> Path:
    """Predicted W1−W2 vs W2−W3 (Vega) with the Jarrett et al. (2011) AGN box; returns the PNG path.

    With ``photometry_path`` (a table with ``w1mpro..w3mpro``), the observed colours are drawn behind.
    The figure is :func:`catalogpred.plots.plot_colour_colour`.
    """
    from .plots import plot_colour_colour as _plot

    return _plot(catalog_path, png_path, photometry_path, title="catalogpred DEMO predictions (mock survey)")


def _dask_mapper(client):
    def mapper(fn, iterable):
        futures = client.map(fn, list(iterable), pure=False, batch_size=64)
        return client.gather(futures)

    return mapper


def _desi_demo_photometry(desi, path) -> Path:
    """Mock AllWISE photometry of the DESI mock galaxies, keyed by TARGETID."""
    from .mock import photometry_table

    objs, tids, ras, decs = [], [], [], []
    for plan in desi.files:
        for obj, role, tid, ra, dec in zip(plan.objects, plan.roles, plan.targetids, plan.ra, plan.dec):
            if role == "galaxy" and obj is not None:
                objs.append(obj)
                tids.append(int(tid))
                ras.append(ra)
                decs.append(dec)
    t = photometry_table(objs).drop_columns(["plate", "mjd", "fiberid", "specobjid"])
    t = t.append_column("targetid", pa.array(tids, pa.int64()))
    # the targets' own positions (the FIBERMAP's TARGET_RA/DEC), so a positional cross-match finds them too
    for name, values in (("ra", ras), ("dec", decs)):
        i = t.schema.get_field_index(name)
        t = t.set_column(i, t.schema.field(i), pa.array(values, pa.float64()))
    pq.write_table(t, path)
    return Path(path)


def build_desi_demo_bundle(store_path, photometry_path, out, *, client, seed: int = 42):
    """A DEMO bundle for the DESI grid (DESI and PFS): seeded encoder, head fitted on mock DESI photometry."""
    import torch

    from .model.bundle import ModelCard, save_bundle
    from .model.encoder import SpectrumEncoder
    from .model.train import train_bundle
    from .pipeline import training_table_from_store
    from .spectra import DESI_GRID

    torch.manual_seed(seed + 1)
    summary = ("DEMO bundle (DESI grid, serves DESI and resampled PFS) made by `catalogpred demo`: spender architecture "
               f"with SEEDED RANDOM weights (torch seed {seed + 1}), head fitted on a MOCK DESI survey. Not a published "
               "model; no scientific value on real data.")
    save_bundle(out, SpectrumEncoder(n_pix=DESI_GRID.n_pix).eval(), None, name="catalogpred-demo-desi-encoder",
                version="1", grid=DESI_GRID, card=ModelCard(kind="demo", summary=summary), overwrite=True)
    data = training_table_from_store(store_path, str(photometry_path), str(out), client=client, join_on="targetid",
                                     surveys=["desi"])
    info, _ = train_bundle(data, out, out, n_members=1, seed=seed, name="catalogpred-demo-desi",
                           source=f"mock DESI survey x {photometry_path}", overwrite=True)
    return info


def run_demo(output="demo-output", *, n_spectra: int = 2000, seed: int = 42, n_workers: int | None = None,
             progress: bool | None = None, shard_rows: int = 512, surveys=("sdss", "desi", "pfs"),
             n_desi_files: int = 2, n_pfs_objects: int = 60) -> dict:
    """Run the demo end to end; returns paths and summaries. Prints the results (stdout) and logs (stderr).

    ``surveys`` picks the mock surveys: SDSS spec files (``n_spectra``), DESI healpix coadds with redrock
    files (``n_desi_files`` × 150 fibres) and PFS pfsCoadd/pfsObject files (``n_pfs_objects``), all in one store.
    """
    from .cluster import dask_client
    from .mock import PHOTOMETRY_FILENAME, write_sdss_survey
    from .pipeline import run_ingest, run_predict
    from .query import open_catalog, write_table

    t0 = time.perf_counter()
    out = Path(output)
    surveys = tuple(dict.fromkeys(str(x).strip().lower() for x in surveys if str(x).strip()))
    unknown = [x for x in surveys if x not in DEMO_SURVEYS]
    if unknown or not surveys:
        raise ConfigError(f"surveys {','.join(surveys) or 'none'}: " + (f"unknown survey {', '.join(unknown)}; "
                          if unknown else "") + f"choose from {','.join(DEMO_SURVEYS)} (comma-separated)")
    if "pfs" in surveys and "desi" not in surveys:
        raise ConfigError("surveys: pfs needs desi too (the PFS spectra are predicted by the DESI-grid bundle, "
                          "trained on the mock DESI survey): sdss,desi,pfs")
    if n_spectra < MIN_SPECTRA:  # the demo's head is trained on them (1 spectrum failed in training; 5 and 10 worked)
        raise ConfigError(f"n_spectra must be at least {MIN_SPECTRA}, not {n_spectra}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; the demo writes a directory (mock/, store.zarr/, model/, catalog/) "
                          "there: choose another output")
    subs = ("mock", "store.zarr", "model", "model-desi", "catalog")
    marker = out / DEMO_MARKER
    if not _made_by_demo(out) and any((out / sub).exists() for sub in subs):  # not ours: never delete it
        raise ConfigError(f"{out} holds {', '.join(s for s in subs if (out / s).exists())} that `catalogpred demo` "
                          "did not make (no " + DEMO_MARKER + "); choose another --output")
    for sub in subs:
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `catalogpred demo`: it replaces mock/, store.zarr/, model*/ and catalog/ here\n")
    with dask_client(n_workers) as client:
        t = time.perf_counter()
        survey = write_sdss_survey(out / "mock" / "sdss", n_spectra, seed=seed, mapper=_dask_mapper(client),
                                   n_bad=DEMO_BAD_INPUTS)
        log.info("mock SDSS survey: %d spec files (+%d bad inputs) in %.1f s", len(survey.objects), len(survey.bad),
                 time.perf_counter() - t)
        desi = None
        if "desi" in surveys:
            from .mock_survey import write_desi_survey

            desi = write_desi_survey(out / "mock" / "desi", n_desi_files, spectra_per_file=150, seed=seed,
                                     resolution=False, mapper=_dask_mapper(client))
            desi_phot = _desi_demo_photometry(desi, out / "mock" / "desi" / PHOTOMETRY_FILENAME)
            log.info("mock DESI survey: %d coadd + redrock files", len(desi.coadd_paths))
        if "pfs" in surveys:
            from .mock_pfs import write_pfs_survey

            pfs = write_pfs_survey(out / "mock" / "pfs", n_pfs_objects, seed=seed)
            log.info("mock PFS survey: %d files", len(pfs.paths))
        ing = run_ingest([str(out / "mock")], str(out / "store.zarr"), client=client, shard_rows=shard_rows,
                         chunk_rows=min(256, shard_rows), progress=progress)
        print(ing.table(), file=sys.stderr)
        t = time.perf_counter()
        info = build_demo_bundle(out / "store.zarr", survey.photometry_path, out / "model", client=client, seed=seed)
        log.info("demo bundle %s written to %s (%.1f s)", info.model_id, out / "model", time.perf_counter() - t)
        models = [str(out / "model")]
        if desi is not None:
            dinfo = build_desi_demo_bundle(out / "store.zarr", desi_phot, out / "model-desi", client=client, seed=seed)
            log.info("DESI-grid demo bundle %s written to %s", dinfo.model_id, out / "model-desi")
            models.append(str(out / "model-desi"))
        pred = run_predict(str(out / "store.zarr"), models, str(out / "catalog"), client=client,
                           progress=progress, catalog_name="catalogpred_demo")
        print(pred.table(), file=sys.stderr)
    png = plot_colour_colour(out / "catalog", out / "colour_colour.png", survey.photometry_path)
    counts = open_catalog(out / "catalog").sql("SELECT survey, count(*) AS n FROM catalog GROUP BY survey ORDER BY survey")
    print("rows per survey: " + ", ".join(f"{s} {n}" for s, n in zip(counts.column("survey").to_pylist(),
                                                                        counts.column("n").to_pylist())))
    cat = open_catalog(out / "catalog")
    obj = survey.objects[0]
    cone = cat.cone(obj.plate_ra, obj.plate_dec, radius_arcsec=600).select(
        ["source_id", "ra", "dec", "z", "w1_mag", "w1_mag_err", "w2_mag", "w3_mag", "w4_mag", "flags"])
    res = cone.to_arrow()
    print(f"\ncone query: 600 arcsec around (ra, dec) = ({obj.plate_ra:.4f}, {obj.plate_dec:.4f}) deg -> {res.num_rows} rows "
          f"(first 10; magnitudes Vega)")
    write_table(res.slice(0, 10), sys.stdout, ".csv")
    dt = time.perf_counter() - t0
    bundles = f"{out / 'model'} (SDSS)" + (f", {out / 'model-desi'} (" + " + ".join(
        s.upper() for s in ("desi", "pfs") if s in surveys) + ")" if desi is not None else "")
    print(f"\ndemo finished in {dt:.0f} s\n  catalog: {out / 'catalog'}\n  store:   {out / 'store.zarr'}\n"
          f"  models:  {bundles}: DEMO bundles, see MODEL_CARD.md\n"
          f"  plot:    {png}\n"
          f"try: catalogpred query {out / 'catalog'} --cone {obj.plate_ra:.4f} {obj.plate_dec:.4f} 600 --where 'z < 0.1' "
          "--columns source_id,z,w1_mag,w1_mag_err,w2_mag,w2_mag_err")
    return {"ingest": ing, "predict": pred, "survey": survey, "png": png, "seconds": dt}
