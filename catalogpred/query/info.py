"""``catalogpred info``: :func:`catalog_info` (rows per survey, sky area, models and their cards, run
manifest, columns) and :func:`format_info`, its text report.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..catalog import SPATIAL_INDEX_ORDER, runtime_text
from .catalog_query import open_catalog
from .convert import _field_meta
from .regions import SKY_AREA_DEG2


def catalog_info(path, *, moc_order: int = 8) -> dict:
    """Everything ``catalogpred info`` reports, as a dict (JSON-serialisable).

    Rows per survey, sky area (leaves, and a MOC of the rows at ``moc_order``), model and card,
    run manifest counts and the columns with units and descriptions.
    """
    q = open_catalog(path)
    path = q.path
    manifest_path = path / "run_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    t = q.select(["survey", "_healpix_29"]).to_arrow()
    surveys = {}
    if t.num_rows:
        vc = pc.value_counts(t.column("survey"))
        surveys = {str(s["values"]): int(s["counts"]) for s in vc.to_pylist()}
    h29 = t.column("_healpix_29").to_numpy()
    moc_cells = len(np.unique(h29 >> (2 * (SPATIAL_INDEX_ORDER - moc_order)))) if len(h29) else 0
    models = [_model_summary(m) for m in _manifest_models(manifest)]
    files = q.files()
    columns = []
    for f in q.schema:
        md = _field_meta(f)
        columns.append({"name": f.name, "type": _type_name(f.type), "unit": md.get("unit", ""), "ucd": md.get("ucd", ""),
                        "description": md.get("description", "")})
    return {
        "path": str(path),
        "name": q.properties.get("obs_collection", path.name),
        "rows": int(t.num_rows),
        "rows_per_survey": surveys,
        "order": q.order,
        "leaves": len(q.pixels),
        "files": len(files),  # data files; one per leaf unless predict ran with --no-merge
        "leaves_of_several_files": sum(n > 1 for n in Counter(os.path.dirname(f) for f in files).values()),
        "area_deg2": {"leaves": len(q.pixels) * SKY_AREA_DEG2 / (12 * 4 ** q.order),
                      "moc": moc_cells * SKY_AREA_DEG2 / (12 * 4 ** moc_order), "moc_order": moc_order,
                      "moc_cells": moc_cells},
        "models": models,
        "manifest": {k: manifest.get(k) for k in ("created", "catalogpred_run", "store", "surveys", "settings", "counts",
                                                  "versions", "model_runtime") if k in manifest},
        "magnitude_system": q.properties.get("catalogpred_magnitude_system", ""),
        "columns": columns,
    }


def _type_name(t: pa.DataType) -> str:
    """Short type names: ``float32[6]`` for the latents, ``string``, ``float64``."""
    names = {pa.float32(): "float32", pa.float64(): "float64", pa.string(): "string"}
    if pa.types.is_fixed_size_list(t):
        return f"{_type_name(t.value_type)}[{t.list_size}]"
    return names.get(t, str(t))


def _manifest_models(manifest: dict) -> list[dict]:
    """The models of a run manifest, each once, with the surveys whose rows it predicted: ``models`` is keyed by
    survey (a DESI-grid bundle serves DESI and PFS), and the single ``model`` entry (the first survey's) fills
    in what older manifests did not record per survey (grid, kind)."""
    entries: dict[str, dict] = {}
    models = manifest.get("models")
    if isinstance(models, dict):
        models = [{**m, "surveys": [survey]} for survey, m in models.items() if isinstance(m, dict)]
    for m in models if isinstance(models, list) else []:
        if not isinstance(m, dict):
            continue
        e = entries.setdefault(m.get("model_id", "?"), {**m, "surveys": []})
        e["surveys"] = e["surveys"] + [s for s in m.get("surveys", []) if s not in e["surveys"]]
    single = manifest.get("model")
    if isinstance(single, dict):
        e = entries.setdefault(single.get("model_id", "?"), {"surveys": []})
        for k, v in single.items():
            e.setdefault(k, v)
    return list(entries.values())


def _model_summary(model: dict) -> dict:
    """A manifest model entry plus its card (from ``bundle.json`` next to ``model.path``, when it still exists)."""
    model = dict(model)
    bundle = Path(model["path"]) / "bundle.json" if model.get("path") else None
    if bundle is None:
        return model
    if not bundle.exists():
        model["card_error"] = f"{bundle} not found (the model bundle moved?)"
        return model
    try:
        b = json.loads(bundle.read_text())
    except (OSError, ValueError) as exc:
        model["card_error"] = f"cannot read {bundle}: {exc}"
        return model
    card = b.get("card") or {}
    metrics = card.get("metrics") or {}
    model["n_latent"] = b.get("n_latent")
    model["card"] = {k: card[k] for k in ("kind", "summary", "training_data", "limitations") if card.get(k)}
    model.setdefault("kind", card.get("kind", "?"))
    if isinstance(b.get("grid"), dict) and b["grid"].get("name"):
        model.setdefault("grid", b["grid"]["name"])  # manifests before 2026-11-27 name one model's grid only
    model["card"]["metrics"] = _band_metrics(metrics)
    model["card"]["metrics_on"] = metrics.get("evaluated_on", "validation")  # bundles before the test split: validation
    if isinstance(metrics.get("evaluation"), dict):  # `catalogpred models evaluate` on a held-out table
        model["card"]["evaluation"] = _band_metrics(metrics["evaluation"])
    return model


def _band_metrics(metrics: dict) -> dict:
    """``{band: {chi2_n, mae, bias, coverage_68}}`` of a card's metrics (other keys: counts, the split)."""
    return {bnd: {k: metrics[bnd][k] for k in ("n", "chi2_n", "mae", "bias", "coverage_68") if k in metrics[bnd]}
            for bnd in ("w1", "w2", "w3", "w4") if isinstance(metrics.get(bnd), dict)}


def format_info(info: dict, width: int = 70) -> str:
    """The text report of :func:`catalog_info`."""
    man, a = info["manifest"], info["area_deg2"]
    counts = man.get("counts", {})
    out = [f"catalog   {info['path']}  ({info['name']})",
           f"  rows      {info['rows']:,d}" + (f"   rejects {counts['rejects']:,d}   inputs {counts['inputs']:,d}"
                                               if "rejects" in counts else "")]
    for s, n in sorted(info["rows_per_survey"].items()):
        out.append(f"    {s:<12} {n:,d}")
    out.append(f"  sky       {a['moc']:.2f} deg2 covered (MOC of the rows at order {a['moc_order']}, "
               f"{a['moc_cells']} cells); leaves {info['leaves']} HEALPix pixels at order {info['order']} "
               f"= {a['leaves']:.1f} deg2")
    if info["leaves_of_several_files"]:
        out.append(f"  files     {info['files']:,d} Parquet files: {info['leaves_of_several_files']:,d} leaves hold "
                   "several (written with predict --no-merge; the same predict without it merges them)")
    else:
        out.append(f"  files     {info['files']:,d} Parquet files, one per leaf")
    for m in info["models"]:
        surveys = f", surveys {', '.join(m['surveys'])}" if m.get("surveys") else ""
        out.append(f"  model     {m.get('model_id', '?')} (kind {m.get('kind', '?')}, grid {m.get('grid', '?')}{surveys})")
        out.append(f"    path    {m.get('path', '?')}")
        card = m.get("card") or {}
        for k in ("summary", "training_data", "limitations"):
            if card.get(k):
                out.append(f"    {k + ':':<15}" + _wrap(card[k], width, 19))
        for label, key in ((card.get("metrics_on", "validation"), "metrics"), ("evaluation", "evaluation")):
            for bnd, mt in (card.get(key) or {}).items():
                out.append(f"    {bnd} {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in mt.items()))
        if m.get("card_error"):
            out.append(f"    card: {m['card_error']}")
    if man:
        out.append(f"  run       {man.get('catalogpred_run', '?')} {man.get('created', '')}; store {man.get('store', '?')}")
        reasons = counts.get("rejects_by_reason") or {}
        if reasons:
            out.append("    rejects by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
        settings = man.get("settings") or {}
        if settings:
            out.append("    settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        for rt in man.get("model_runtime") or []:  # what ran the model on the workers, per distinct setup
            out.append(f"    model ran on: {runtime_text(rt)}")
    if info.get("magnitude_system"):
        out.append(f"  magnitudes {info['magnitude_system']}")
    out.append("  columns:")
    wn = max(len(c["name"]) for c in info["columns"])
    wt = max(len(c["type"]) for c in info["columns"])
    wu = max([len(c["unit"]) for c in info["columns"]] + [4])
    out.append(f"    {'name':<{wn}}  {'type':<{wt}}  {'unit':<{wu}}  description")
    for c in info["columns"]:
        out.append(f"    {c['name']:<{wn}}  {c['type']:<{wt}}  {c['unit']:<{wu}}  {c['description']}")
    return "\n".join(out)


def _wrap(text: str, width: int, indent: int) -> str:
    import textwrap

    return ("\n" + " " * indent).join(textwrap.wrap(text, width)) or ""
