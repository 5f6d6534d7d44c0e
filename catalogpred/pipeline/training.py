"""The head's training set from a store on Dask: latents computed on the cluster, joined to WISE photometry
(:func:`training_table_from_store`)."""
from __future__ import annotations

import logging

import numpy as np

from .. import store
from ..cluster import same_code, shared_path
from ..errors import ConfigError

__all__ = ["training_table_from_store"]

log = logging.getLogger(__name__)


def training_table_from_store(store_path: str, photometry_path: str, encoder_bundle: str, *, client,
                              join_on: str | None = None, match_radius_arcsec: float | None = None,
                              surveys: list[str] | None = None, mag_system: str = "auto") -> dict:
    """Latents (computed on the cluster), z, norm and matched WISE photometry for the head, as
    :func:`~catalogpred.model.train.read_training_table` returns them.

    Photometry is joined on an id column (``join_on``, compared as strings, e.g. ``specobjid``)
    or matched on the sky (nearest within ``match_radius_arcsec``). ``groups`` names each row's object by the
    photometry row it matched, so that repeat spectra of one object share a train/validation/test split. Non-detections keep their σ
    (≥ 99 means no weight in training). The photometry columns and their system (``mag_system``, AB
    converted to Vega) are read as :func:`~catalogpred.tables.wise_vega_magnitudes` reads them.
    """
    import pyarrow as pa

    from ..model.bundle import read_bundle_info
    from ..tables import read_table_any, wise_vega_magnitudes
    from ..tasks import encode_rows

    encoder_bundle = shared_path(encoder_bundle)
    store_path = shared_path(store_path)
    info = read_bundle_info(encoder_bundle)
    phot = read_table_any(photometry_path)
    # observed W1-W4 as Vega (AB converted), one row per photometry row: carried through the match by row number
    obs_mag, obs_err, used = wise_vega_magnitudes(phot, mag_system, what=str(photometry_path))
    log.info("photometry: %s", ", ".join(f"{b} {m}/{e} ({sys_})" for b, (m, e, sys_) in used.items()))
    phot = phot.append_column("_phot_row", pa.array(np.arange(phot.num_rows)))
    pcols = {c.lower(): c for c in phot.column_names}
    parts, keyed = [], []
    for name in surveys or store.list_surveys(store_path):
        g, layout = store.open_survey(store_path, name)
        if layout.grid != info.grid:
            continue
        key_col = next((c for c in layout.meta_columns if join_on and c.lower() == join_on.lower()), None)
        want = ["source_id", "ra", "dec", "z", "norm", "status"] + ([key_col] if key_col else [])
        table = store.read_meta(store_path, name, columns=list(dict.fromkeys(want)))
        table = table.filter(pa_equal(table.column("status"), store.RowStatus.OK))
        meta = table.drop_columns([key_col]).to_pandas() if key_col else table.to_pandas()
        if key_col:  # the key as text per group, from the exact values (ints stay ints, not floats after concat)
            meta["_key"] = [str(v).strip() if v is not None else None for v in table.column(key_col).to_pylist()]
            keyed.append(name)
        meta["survey_group"] = name
        parts.append(meta)
    if not parts:
        raise ConfigError(f"{store_path} has no survey on the {info.grid.name} grid of {encoder_bundle}")
    import pandas as pd

    meta = pd.concat(parts, ignore_index=True)
    if join_on:
        if join_on.lower() not in pcols or not keyed:
            groups = ", ".join(str(m["survey_group"].iloc[0]) for m in parts if len(m)) or "none"
            raise ConfigError(f"--join-on {join_on}: " + (
                f"{photometry_path} has no such column" if join_on.lower() not in pcols else
                f"no store group on the encoder's {info.grid.name} grid ({groups}) has it"))
        if len(keyed) < len(parts):
            log.info("--join-on %s: only the groups %s have it", join_on, ", ".join(keyed))
        p = phot.to_pandas()
        p["_key"] = [str(v).strip() if v is not None else None for v in phot.column(pcols[join_on.lower()]).to_pylist()]
        m = meta.merge(p, on="_key", how="inner", suffixes=("", "_phot"))
    else:
        from astropy import units as u
        from astropy.coordinates import SkyCoord

        rc = next((pcols[c] for c in ("ra", "raj2000", "ra_deg") if c in pcols), None)
        dc = next((pcols[c] for c in ("dec", "dej2000", "dec_deg") if c in pcols), None)
        if rc is None or dc is None:
            raise ConfigError(f"{photometry_path} has no ra/dec columns for a positional match")
        p = phot.to_pandas()
        idx, sep, _ = SkyCoord(meta["ra"].to_numpy() * u.deg, meta["dec"].to_numpy() * u.deg).match_to_catalog_sky(
            SkyCoord(p[rc].to_numpy() * u.deg, p[dc].to_numpy() * u.deg))
        ok = sep.to_value(u.arcsec) <= match_radius_arcsec
        m = pd.concat([meta[ok].reset_index(drop=True), p.iloc[idx[ok]].reset_index(drop=True).add_suffix("_phot")], axis=1)
        m = m.rename(columns={"_phot_row_phot": "_phot_row"})
    if len(m) == 0:
        raise ConfigError("no spectrum matched the photometry; check --join-on / --match-radius")
    log.info("training set: %d spectra matched to %s", len(m), photometry_path)
    futures = []
    for (name,), grp in m.groupby(["survey_group"]):
        rows = grp["row"].to_numpy()
        for chunk in np.array_split(rows, max(1, len(rows) // 2048)):
            futures.append((grp.index[np.isin(rows, chunk)],
                            client.submit(same_code(encode_rows), store_path, name, chunk, encoder_bundle, pure=False)))
    latents = np.zeros((len(m), info.n_latent), np.float32)
    for index, fut in futures:
        latents[m.index.get_indexer(index)] = fut.result()
    rows = m["_phot_row"].to_numpy(np.int64)
    return {"ids": m["source_id"].tolist(), "latents": latents, "z": m["z"].to_numpy(np.float64),
            "log_norm": np.log10(m["norm"].to_numpy(np.float64)), "mag": obs_mag[rows], "mag_err": obs_err[rows],
            "groups": [f"photometry-row-{r}" for r in rows.tolist()], "layout": "store"}


def pa_equal(column, value):
    import pyarrow.compute as pc

    return pc.equal(column, value)
