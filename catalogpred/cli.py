"""The ``catalogpred`` command. Data goes to stdout, logs and progress to stderr; exit 1 on failure.

Each subcommand is ``catalogpred <cmd> --help``; ``main(argv)`` takes an argument list so tests call it directly.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap

from . import __version__
from .errors import CatalogpredError

log = logging.getLogger("catalogpred")

EPILOGS = {
    "ingest": """\
        examples:
          catalogpred ingest spectra/ --store store.zarr
          catalogpred ingest 'sdss/spec-02*.fits' @more-files.txt --store store.zarr --workers 4
        Re-running the same command resumes: files already in finished shards are skipped.""",
    "predict": """\
        examples:
          catalogpred predict --store store.zarr --model model/ --catalog catalog/
          catalogpred predict --store store.zarr --model model/ --catalog catalog/ --overwrite
        Re-running into an existing catalog resumes (finished blocks are skipped).""",
    "query": """\
        examples:
          catalogpred query catalog/ --cone 150.0 2.0 60 --columns source_id,ra,dec,w1_mag,w1_mag_err
          catalogpred query catalog/ --cone 150.0 2.0 3600 --where 'w1_mag - w2_mag > 0.8' -o agn.fits
        Magnitudes are Vega (AllWISE w?mpro); CSV goes to stdout unless -o is given.""",
    "demo": """\
        example:
          catalogpred demo --output demo-output --n-spectra 2000
        Writes a mock SDSS survey, ingests it, builds a clearly labelled DEMO model bundle,
        predicts, and prints a summary and a cone query.""",
    "info": """\
        example:
          catalogpred info demo-output/catalog""",
}


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    g.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--scheduler-file", default=None, help="scheduler file of an existing Dask cluster")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="catalogpred", description="WISE W1-W4 predictions from optical spectra, at catalog scale.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"catalogpred {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: tracebacks, debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=textwrap.dedent(EPILOGS.get(name, "")),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    s = add("ingest", "Read survey files into a chunked, compressed Zarr store.")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories, globs, or @filelist.txt")
    s.add_argument("--store", required=True, help="Zarr store directory (created if missing)")
    s.add_argument("--survey", default="auto", help="reader to use (sdss) or 'auto' to detect by content (default)")
    s.add_argument("--shard-rows", type=int, default=4096, help="spectra per shard = per task (default 4096)")
    s.add_argument("--chunk-rows", type=int, default=256, help="spectra per compressed chunk (default 256)")
    s.add_argument("--strict", action="store_true", help="exit 1 if any spectrum is rejected")
    s.add_argument("--dry-run", action="store_true", help="list what would be ingested and exit")
    _add_cluster_args(s)

    s = add("predict", "Run encoder + IR head over a store and write a HATS catalog.")
    s.add_argument("--store", required=True, help="Zarr store made by `catalogpred ingest`")
    s.add_argument("--model", required=True, help="model bundle directory")
    s.add_argument("--catalog", required=True, help="output catalog directory")
    s.add_argument("--overwrite", action="store_true", help="delete an existing catalog first (default: resume)")
    s.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="inference precision (default fp32)")
    s.add_argument("--batch-size", type=int, default=256, help="spectra per forward pass (default 256)")
    s.add_argument("--order", type=int, default=None, help="HEALPix order of the leaves (default: from the row count)")
    s.add_argument("--torch-threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    s.add_argument("--strict", action="store_true", help="exit 1 if any spectrum is rejected")
    s.add_argument("--dry-run", action="store_true", help="print the plan (blocks, model, order) and exit")
    _add_cluster_args(s)

    s = add("query", "Cone searches and column filters on a catalog; CSV to stdout or a file.")
    s.add_argument("catalog", help="catalog directory")
    s.add_argument("--cone", nargs=3, type=float, metavar=("RA", "DEC", "RADIUS_ARCSEC"), help="cone (deg, deg, arcsec)")
    s.add_argument("--where", action="append", default=[], help="filter expression on columns, e.g. 'z < 0.1' (repeatable)")
    s.add_argument("--columns", default=None, help="comma-separated output columns")
    s.add_argument("--limit", type=int, default=None, help="at most this many rows")
    s.add_argument("-o", "--output", default=None, help="write .csv, .parquet or .fits instead of CSV on stdout")

    s = add("info", "Summarise a catalog: rows, model, columns with units.")
    s.add_argument("catalog", help="catalog directory")

    s = add("demo", "End to end on a mock SDSS survey (what `make demo` runs).")
    s.add_argument("--output", default="demo-output", help="output directory (default demo-output)")
    s.add_argument("--n-spectra", type=int, default=2000, help="mock spectra to generate (default 2000)")
    s.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    s.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _quiet_dask(args) -> None:
    """distributed configures its own loggers on import; keep them at WARNING unless -vv."""
    import distributed  # noqa: F401

    for noisy in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core", "distributed.worker"):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.verbose < 2 else logging.INFO)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("catalogpred").setLevel(logging.INFO if not quiet and verbose == 0 else level)
    if verbose == 0:
        logging.getLogger("catalogpred.tasks").setLevel(logging.WARNING)
    for noisy in ("distributed", "tornado", "asyncio", "numcodecs", "zarr"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)


def _client(args):
    from .cluster import dask_client

    _quiet_dask(args)

    return dask_client(args.workers, scheduler=args.scheduler, scheduler_file=args.scheduler_file)


def _progress(args):
    return False if args.no_progress else None


def cmd_ingest(args) -> int:
    from .pipeline import expand_inputs, run_ingest

    if args.dry_run:
        paths = expand_inputs(args.inputs)
        for path in paths:
            print(path)
        log.info("dry run: %d files would be ingested into %s", len(paths), args.store)
        return 0
    with _client(args) as client:
        summary = run_ingest(args.inputs, args.store, client=client, survey=args.survey, shard_rows=args.shard_rows,
                             chunk_rows=args.chunk_rows, progress=_progress(args))
    print(summary.table(), file=sys.stderr)
    if args.strict and summary.rejected:
        log.error("--strict: %d spectra rejected", summary.rejected)
        return 1
    return 0


def cmd_predict(args) -> int:
    from .pipeline import run_predict

    if args.dry_run:
        from . import store
        from .model.bundle import read_bundle_info

        info = read_bundle_info(args.model)
        plan = {"model_id": info.model_id, "grid": info.grid.name, "store": args.store,
                "blocks": {s: int(len(store.done_shards(args.store, s))) for s in store.list_surveys(args.store)},
                "catalog": args.catalog}
        print(json.dumps(plan, indent=2))
        return 0
    with _client(args) as client:
        summary = run_predict(args.store, args.model, args.catalog, client=client, overwrite=args.overwrite,
                              precision=args.precision, batch_size=args.batch_size, order=args.order,
                              torch_threads=args.torch_threads, progress=_progress(args))
    print(summary.table(), file=sys.stderr)
    print(f"catalog written to {args.catalog}", file=sys.stderr)
    if args.strict and summary.rejects:
        log.error("--strict: %d spectra rejected", summary.rejects)
        return 1
    return 0


def cmd_query(args) -> int:
    from .query import open_catalog, write_table

    q = open_catalog(args.catalog)
    if args.cone:
        q = q.cone(*args.cone)
    for w in args.where:
        q = q.where(w)
    if args.columns:
        q = q.select(args.columns)
    table = q.to_arrow()
    if args.limit is not None:
        table = table.slice(0, args.limit)
    if args.output:
        write_table(table, args.output)
        log.info("%d rows written to %s", table.num_rows, args.output)
    else:
        write_table(table, sys.stdout, ".csv")
    return 0


def cmd_info(args) -> int:
    import pyarrow.parquet as pq
    from pathlib import Path

    path = Path(args.catalog)
    from .query import open_catalog

    q = open_catalog(path)
    manifest = json.loads((path / "run_manifest.json").read_text())
    schema = pq.read_schema(path / "dataset" / "_common_metadata")
    out = [f"catalog {path}", f"  model     {manifest['model']['model_id']} ({manifest['model']['kind']})",
           f"  rows      {manifest['counts']['catalog_rows']:,d}   rejects {manifest['counts']['rejects']:,d}",
           f"  leaves    {len(q.pixels)} HEALPix pixels at order {q.order}", "  columns:"]
    for f in schema:
        md = f.metadata or {}
        out.append(f"    {f.name:<16} {str(f.type):<28} {md.get(b'unit', b'').decode():<26} {md.get(b'description', b'').decode()[:70]}")
    print("\n".join(out))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    _quiet_dask(args)

    run_demo(args.output, n_spectra=args.n_spectra, seed=args.seed, n_workers=args.workers,
             progress=False if args.no_progress else None)
    return 0


COMMANDS = {"ingest": cmd_ingest, "predict": cmd_predict, "query": cmd_query, "info": cmd_info, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return COMMANDS[args.command](args)
    except CatalogpredError as exc:
        if args.verbose >= 2:
            log.exception("failed")
        print(f"catalogpred {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
