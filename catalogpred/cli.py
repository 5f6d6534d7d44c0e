"""The ``catalogpred`` command. Data goes to stdout, logs and progress to stderr; exit 1 on failure.

Each subcommand is ``catalogpred <cmd> --help``; ``main(argv)`` takes an argument list so tests call it directly.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap

from . import __version__, runlock
from .cluster import BLOCKS_PER_GPU, COMPILE_AUTO_ROWS, DEFAULT_DASHBOARD
from .errors import CatalogpredError, ConfigError

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
          catalogpred predict --store store.zarr --model model/ --catalog catalog/ --device cuda --precision bf16
        Re-running into an existing catalog resumes (finished blocks are skipped; blocks that failed
        on every retry, whose spectra went to rejects as predict_error, are tried again).
        environment (read on the workers):
          CATALOGPRED_WRITE_THREADS  threads writing a block's part files (default: the CPU count up to
                                     8 on GPU and I/O workers, 1 on CPU workers)
          CATALOGPRED_ENCODER_IMPL   conv|gemm|nhwc: force one encoder implementation (default: conv on
                                     CPUs, the fastest, timed once, on GPUs)""",
    "query": """\
        examples:
          catalogpred query catalog/ --cone 150.0 2.0 60 --columns source_id,ra,dec,w1_mag,w1_mag_err
          catalogpred query catalog/ --cone 150.0 2.0 1deg --where 'w1_mag - w2_mag > 0.8' -o agn.fits
          catalogpred query catalog/ --cone 10:00:28.6 -02:12:21 30arcmin          # RA in hours
          catalogpred query catalog/ --box 350 10 -5 5 --limit 20          # RA 350..360 and 0..10
          catalogpred query catalog/ --id sdss-0266-51602-0013     # ids as `--columns source_id` lists them
          catalogpred query catalog/ --where '(flags & 2) == 0' --limit 20      # bit 2 (LOW_SN) not set
          catalogpred query catalog/ --cone 150 2 3600 --sql 'SELECT survey, count(*) AS n FROM catalog GROUP BY survey'
        Magnitudes are Vega (AllWISE w?mpro). On a terminal the result is an aligned table (first 50
        rows unless --limit); piped, it is CSV. -o writes .parquet, .fits or .vot (VOTable) with units,
        UCDs and descriptions, or .csv (values only, no units). --where takes pandas expressions ('&'
        and '|' bind like 'and'/'or', so a bit test needs parentheses: '(flags & 1) > 0'); --sql DuckDB
        SQL on the view `catalog` (after the --cone/--box/--id/--where cuts); with --sql, --columns
        picks columns of the SQL result.""",
    "crossmatch": """\
        examples:
          catalogpred crossmatch catalog/ allwise.parquet --radius 1.5 -o matched.fits
          catalogpred crossmatch catalog/ targets.csv --ra-col RAJ2000 --dec-col DEJ2000 --radius 0.1arcmin --excess-only
        Nearest catalog row within --radius (arcsec, or with a unit) of each external row; adds
        separation_arcsec. External positions are read in their column's unit (FITS TUNIT, VOTable
        unit: deg, rad, hourangle), degrees when they have none, or as sexagesimal text.
        With observed W1-W4 (w1mpro/w1sigmpro, w1_mag/w1_mag_err or W1mag/e_W1mag) it adds
        w?_mag_obs (observed, Vega: AB converted, see --mag-system), w?_excess = m_pred - m_obs and
        w?_excess_sigma = (m_pred - m_obs)/sqrt(s_pred^2 + s_obs^2): positive = brighter in the IR than
        the optical predicts. ir_excess flags any band above --excess-threshold (default 3 sigma);
        non-detections (sigma null or >= 99) give null.""",
    "plot": """\
        examples:
          catalogpred plot demo-output/catalog -o plots/
          catalogpred plot demo-output/catalog -o plots/ --external demo-output/mock/sdss/allwise_photometry.parquet
        Writes sky_density.png (Mollweide, HEALPix), colour_colour.png (W1-W2 vs W2-W3 with the
        Jarrett+11 AGN box), magnitudes.png and predicted_vs_observed.png (with --external: after a
        crossmatch with it; without: from the catalog's own observed WISE, DESI's flux_w1/flux_w2 as
        query --ir-excess compares them, where the catalog has some); prints their paths.""",
    "demo": """\
        example:
          catalogpred demo --output demo-output --n-spectra 2000
          catalogpred demo --surveys sdss --n-spectra 500         # SDSS only, quicker
        Writes mock SDSS, DESI and PFS surveys (--surveys), ingests them into one store, builds
        clearly labelled DEMO model bundles (SDSS grid; DESI grid for DESI and PFS), predicts,
        and prints a summary and a cone query.""",
    "train": """\
        examples:
          catalogpred train --table reference.csv --encoder sdss_II/ -o sdss_II-ir/
          catalogpred train --store sdss.zarr --photometry allwise.parquet --join-on specobjid --encoder sdss_II/ -o m/
          catalogpred train --store sdss.zarr --photometry allwise.fits --match-radius 1.5 --encoder sdss_II/ -o m/
        chi = (m_pred - m_obs)/sqrt(sigma_pred^2 + sigma_obs^2); the card gets per-band chi2_N and coverage.""",
    "models": """\
        examples:
          catalogpred models import-spender spender.sdss.paperII-c273bb69.pt --survey sdss -o sdss_II/
          catalogpred models fetch sdss_II
          catalogpred models evaluate m/ heldout.csv --png eval.png""",
    "info": """\
        examples:
          catalogpred info demo-output/catalog
          catalogpred info demo-output/catalog --json
          catalogpred info demo-output/store.zarr
          catalogpred info demo-output/model
        A catalog: rows per survey, sky area, model and its card, run manifest, columns with units.
        A store: per survey, spectra ready and rejected (by reason), shards, grid, size, ingest runs.
        A model bundle: its model card (bundle.json with --json).""",
    "submit": """\
        examples:
          catalogpred submit slurm --jobs 4 --cores 16 --memory 64GB --dry-run -- predict --store s.zarr --model m/ --catalog c/
          catalogpred submit slurm --config deploy/slurm/jobqueue.yaml --jobs 4 --gpus-per-job 1 \\
              -- predict --store /shared/s.zarr --model /shared/model --catalog /shared/catalog
          catalogpred submit pbs --jobs 8 --cores 32 --memory 128GB --queue workq -- ingest /shared/sdss --store /shared/s.zarr
        Starts a Dask scheduler here, submits N batch jobs of workers (dask-jobqueue), waits for
        them, then runs the command after `--` on that cluster; the jobs are cancelled at the end.
        GPU jobs run `dask cuda worker --resources GPU=1`. Paths must be on a shared filesystem.
        --dry-run prints the job script and submits nothing. Settings: flags > --config YAML
        (jobqueue.slurm.* / jobqueue.pbs.* keys) > ~/.config/dask/*.yaml.""",
}


def _add_cluster_args_only(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (for --store)")
    g.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    g.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler")
    g.add_argument("--scheduler-file", default=None, help="scheduler file of an existing Dask cluster")


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    g.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--scheduler-file", default=None, help="scheduler file of an existing Dask cluster")
    g.add_argument("--wait-workers", type=int, default=None, metavar="N",
                   help="with --scheduler/--scheduler-file: wait until N workers are connected (default 1)")
    g.add_argument("--dashboard", action="store_true",
                   help="local cluster: serve the Dask dashboard at --dashboard-address and log its link")
    g.add_argument("--dashboard-address", default=None, metavar="HOST:PORT",
                   help=f"where --dashboard serves it (default {DEFAULT_DASHBOARD}; another free port if that one is "
                        "taken); implies --dashboard")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")


def _add_output_args(p: argparse.ArgumentParser, columns_help: str = "comma-separated output columns") -> None:
    g = p.add_argument_group("output")
    g.add_argument("--columns", default=None, help=columns_help)
    g.add_argument("--limit", type=int, default=None, help="at most this many rows")
    g.add_argument("-o", "--output", default=None,
                   help="write .parquet, .fits or .vot (with units) or .csv (values only) instead of stdout; "
                        "the directory must exist")
    g.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    g.add_argument("--format", choices=("auto", "table", "csv"), default="auto",
                   help="stdout format: aligned table on a terminal, CSV when piped (default auto)")


#: ``--mag-system`` choices: :data:`catalogpred.tables.MAG_SYSTEMS`, spelled out here so that the CLI starts
#: without pyarrow (tests/test_cli.py checks that the two agree)
MAG_SYSTEMS = ("auto", "vega", "ab")
#: ``predict --order``: HEALPix orders of the leaves (the catalog's spatial index is at order 29)
MIN_ORDER, MAX_ORDER = 0, 29
#: the fewest SDSS spectra the demo's head can be trained on (:data:`catalogpred.demo.MIN_SPECTRA`, spelled
#: out here for --help without importing pyarrow; tests/test_cli.py checks that the two agree)
DEMO_MIN_SPECTRA = 10


def _check_at_least(args, minimum: int, *options: str) -> None:
    """ConfigError for the first of ``options`` (``--batch-size``, ...) given with a value below ``minimum``."""
    for opt in options:
        value = getattr(args, opt.lstrip("-").replace("-", "_"), None)
        if value is not None and value < minimum:
            raise ConfigError(f"{opt} must be at least {minimum}, not {value}")


def _check_ingest_args(args) -> None:
    _check_at_least(args, 1, "--shard-rows", "--chunk-rows", "--workers", "--wait-workers")
    if args.chunk_rows < args.shard_rows and args.shard_rows % args.chunk_rows:
        raise ConfigError(f"--shard-rows {args.shard_rows} is not a multiple of --chunk-rows {args.chunk_rows}: "
                          "a shard holds whole chunks (e.g. --shard-rows 4096 --chunk-rows 256)")


def _check_predict_args(args) -> None:
    _check_at_least(args, 1, "--batch-size", "--workers", "--wait-workers", "--torch-threads", "--blocks-per-gpu",
                    "--workers-per-gpu")
    _check_at_least(args, 0, "--io-workers")
    if args.order is not None and not MIN_ORDER <= args.order <= MAX_ORDER:
        raise ConfigError(f"--order {args.order}: a HEALPix order is {MIN_ORDER}-{MAX_ORDER} (default: from the row "
                          "count, 1-7)")


#: cheap checks of a command's argument values (no file read), run before any work; ``submit`` runs them on the
#: command after ``--`` as well
ARG_CHECKS = {"ingest": _check_ingest_args, "predict": _check_predict_args}


class _ArgumentError(ConfigError):
    """An argparse error of :func:`parse_command` (the parser's own message)."""


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises :class:`_ArgumentError` instead of printing usage and exiting."""

    def error(self, message):
        raise _ArgumentError(f"{self.prog}: {message}")


def parse_command(argv: list[str]) -> argparse.Namespace:
    """``argv`` (a catalogpred command line without the program name) parsed by the CLI's own parser, and its
    argument values checked (:data:`ARG_CHECKS`): a :class:`ConfigError` with the parser's message instead of
    an exit. ``submit`` checks the command after ``--`` with it before submitting anything."""
    args = build_parser(_RaisingParser).parse_args(_keep_coordinates_as_values(argv))
    if args.command in ARG_CHECKS:
        ARG_CHECKS[args.command](args)
    return args


def build_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog="catalogpred", description="WISE W1-W4 predictions from optical spectra, at catalog scale.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"catalogpred {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: tracebacks, debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr (no summaries)")
    # the same two after the command (`catalogpred query ... -q`); SUPPRESS keeps what came before it
    logging_opts = argparse.ArgumentParser(add_help=False)
    logging_opts.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                              help="more logging (-vv: tracebacks, debug)")
    logging_opts.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                              help="only warnings and errors on stderr (no summaries)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=textwrap.dedent(EPILOGS.get(name, "")),
                              formatter_class=argparse.RawDescriptionHelpFormatter, parents=[logging_opts])

    s = add("ingest", "Read survey files into a chunked, compressed Zarr store.")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories, globs, or @filelist.txt")
    s.add_argument("--store", required=True, help="Zarr store directory (created if missing)")
    s.add_argument("--survey", default="auto",
                   help="reader to use (sdss, sdss-plate, desi, pfs) or 'auto' to detect by content (default); "
                        "SDSS spec and spPlate files share the store group 'sdss'")
    s.add_argument("--redshifts", default=None,
                   help="redshift table (FITS/Parquet/CSV with TARGETID or catId/objId and Z) overriding redrock/"
                        "pfsCoZCandidates files; e.g. a DESI zpix catalog; for spPlate files a specObj/spAll table "
                        "(PLATE, MJD, FIBERID, Z), else the one beside the plates is used")
    sel = s.add_argument_group("selection (excluded spectra go to the rejects table with their reason)")
    sel.add_argument("--keep-sky", action="store_true", help="keep sky fibres")
    sel.add_argument("--keep-unassigned", action="store_true",
                     help="keep unassigned fibres (DESI negative TARGETID or blank OBJTYPE; PFS non-science target types)")
    sel.add_argument("--keep-bad-fiberstatus", action="store_true",
                     help="keep DESI COADD_FIBERSTATUS != 0 (FIBERSTATUS in per-exposure spectra files)")
    sel.add_argument("--keep-zwarn", action="store_true",
                     help="keep DESI redshifts with ZWARN != 0 (SDSS ZWARNING != 0 is always kept, and flagged)")
    sel.add_argument("--keep-fluxstd", action="store_true", help="keep PFS flux-standard targets")
    sel.add_argument("--spectypes", default="GALAXY",
                     help="accepted classes (SDSS CLASS, DESI SPECTYPE, PFS), comma-separated, e.g. GALAXY,QSO; "
                          "'any' for all (default GALAXY)")
    s.add_argument("--shard-rows", type=int, default=4096, help="spectra per shard = per task (default 4096)")
    s.add_argument("--chunk-rows", type=int, default=256, help="spectra per compressed chunk (default 256)")
    s.add_argument("--strict", action="store_true", help="exit 1 if any spectrum is rejected")
    s.add_argument("--dry-run", action="store_true", help="list what would be ingested and exit")
    _add_cluster_args(s)

    s = add("predict", "Run encoder + IR head over a store and write a HATS catalog.")
    s.add_argument("--store", required=True, help="Zarr store made by `catalogpred ingest`")
    s.add_argument("--model", required=True, action="append",
                   help="model bundle directory; repeat for stores with several grids (SDSS + DESI/PFS)")
    s.add_argument("--surveys", default=None, help="comma-separated survey groups to predict (default: all)")
    s.add_argument("--catalog", required=True, help="output catalog directory")
    s.add_argument("--overwrite", action="store_true", help="delete an existing catalog first (default: resume)")
    s.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="inference precision: bf16 = the encoder's big convolutions in bfloat16, the rest in "
                        "float32: the fast choice on GPUs (default fp32)")
    s.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                   help="run the encoder through torch.compile on each worker (5-22 s to compile per worker; "
                        "measured: the encoder 2.8x the eager one on an H200, predict 1.64x on an H100, 1.0-1.5x "
                        "end to end on 2 CPU cores; README, Running on GPUs); auto: yes from "
                        f"{COMPILE_AUTO_ROWS['cuda']:,d} spectra per GPU worker or {COMPILE_AUTO_ROWS['cpu']:,d} "
                        "per CPU worker (default auto)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when NVML sees a GPU here (or, with --scheduler, when workers offer the GPU "
                        "resource), else cpu; cuda starts one dask-cuda worker per GPU (needs the [gpu] extra)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="spectra per forward pass (default 64 on CPUs, where it bounds worker memory; 2048 on GPUs)")
    s.add_argument("--blocks-per-gpu", type=int, default=BLOCKS_PER_GPU,
                   help="blocks that share one GPU, so that reading and writing overlap GPU work (default "
                        "%(default)s; GPU workers need at least this many threads)")
    s.add_argument("--workers-per-gpu", type=int, default=1,
                   help="local CUDA cluster: worker processes per GPU (default 1). More give a GPU more host "
                        "processes to read shards and write Parquet, each with its own interpreter lock and CUDA "
                        "context; for runs bound by the host side (see README, Running on GPUs)")
    s.add_argument("--io-workers", type=int, default=0,
                   help="local cluster: also start N CPU worker processes that read shards and write Parquet, so "
                        "each block runs as read (I/O worker), model, write (I/O worker) tasks and the GPU worker "
                        "process only runs the model (default 0: one task per block). On an existing cluster, "
                        "workers started with --resources IO=1 play this part")
    s.add_argument("--read-engine", choices=("auto", "tensorstore", "zarr"), default="auto",
                   help="what reads a shard's numeric arrays (flux, ...) on the workers: tensorstore (C++, outside "
                        "the GIL) or zarr-python; same values. auto: tensorstore where it is installed and the store "
                        "is a local path (default)")
    s.add_argument("--no-merge", dest="merge", action="store_false",
                   help="keep each block's part file (Parquet) in each HEALPix leaf instead of merging every leaf's "
                        "part files (Arrow files) into one Parquet file after the last block (the default, as "
                        "hats-import writes a catalog: queries open one file per leaf)")
    s.add_argument("--order", type=int, default=None,
                   help=f"HEALPix order of the leaves, {MIN_ORDER}-{MAX_ORDER} (default: from the row count, 1-7: "
                        "about 20,000 rows per leaf; a higher order makes more, smaller part files); a resumed "
                        "catalog keeps the order it was started with")
    s.add_argument("--torch-threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    s.add_argument("--strict", action="store_true", help="exit 1 if any spectrum is rejected")
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan (blocks, models, HEALPix order) as JSON and exit")
    _add_cluster_args(s)

    s = add("query", "Cone, box, id, filter and SQL queries on a catalog; a table, CSV or a file.")
    s.add_argument("catalog", help="catalog directory")
    s.add_argument("--cone", nargs=3, metavar=("RA", "DEC", "RADIUS"),
                   help="cone: RA, Dec in deg or sexagesimal (12:50:07.6 -07:02:55 or 12h50m07.6s -7d02m55s), "
                        "radius in arcsec or with a unit (1deg, 30arcmin, 10')")
    s.add_argument("--box", nargs=4, type=float, metavar=("RA_MIN", "RA_MAX", "DEC_MIN", "DEC_MAX"),
                   help="RA/Dec ranges in deg; RA_MIN > RA_MAX wraps through RA 0")
    s.add_argument("--id", action="append", default=[], metavar="SOURCE_ID", help="rows with this source_id (repeatable)")
    s.add_argument("--where", action="append", default=[],
                   help="filter expression on columns, e.g. 'z < 0.1' or '(flags & 1) > 0' (repeatable)")
    s.add_argument("--sql", default=None, help="DuckDB SQL on the view `catalog`, e.g. 'SELECT count(*) FROM catalog' "
                                               "(all columns; --columns then picks from its result)")
    s.add_argument("--ir-excess", action="store_true",
                   help="add the IR-excess columns of crossmatch from the catalog's own observed WISE (DESI: "
                        "the FIBERMAP's Legacy Surveys flux_w1/flux_w2, nanomaggies AB, converted to Vega), after "
                        "the --columns (which name catalog columns only)")
    s.add_argument("--excess-threshold", type=float, default=3.0,
                   help="with --ir-excess: flag ir_excess where any band's excess_sigma exceeds this (default 3)")
    s.add_argument("--excess-only", action="store_true", help="with --ir-excess: only rows flagged ir_excess")
    _add_output_args(s, columns_help="comma-separated output columns (with --sql: columns of the SQL result)")

    s = add("crossmatch", "Match an external table (CSV/Parquet/FITS/VOTable) to the catalog; IR excess.")
    s.add_argument("catalog", help="catalog directory")
    s.add_argument("external", help="external table: CSV, Parquet, FITS or VOTable (identified by content)")
    s.add_argument("--radius", default="1.5",
                   help="match radius in arcsec, or with a unit: 2arcsec, 0.05arcmin (default 1.5)")
    s.add_argument("--ra-col", default=None,
                   help="external RA column, in its unit or deg (default: guessed, e.g. ra, RAJ2000)")
    s.add_argument("--dec-col", default=None,
                   help="external Dec column, in its unit or deg (default: guessed, e.g. dec, DEJ2000)")
    s.add_argument("--excess-threshold", type=float, default=3.0,
                   help="flag ir_excess where any band's excess_sigma exceeds this (default 3)")
    s.add_argument("--excess-only", action="store_true", help="only rows flagged ir_excess")
    s.add_argument("--mag-system", choices=MAG_SYSTEMS, default="auto",
                   help="system of the external W1-W4 magnitudes; AB is converted to Vega (m_AB - 2.699, 3.339, "
                        "5.174, 6.620) before the excess (default auto: AB where a column's unit says mag(AB), "
                        "else Vega, as AllWISE/unWISE/CatWISE are)")
    s.add_argument("--keep-unmatched", action="store_true", help="keep external rows without a match (catalog columns empty)")
    s.add_argument("--where", action="append", default=[], help="filter on catalog columns before matching (repeatable)")
    _add_output_args(s, columns_help="catalog columns in the output, comma-separated, or 'all' "
                                     "(default: the catalog's default columns)")

    s = add("plot", "PNG figures of a catalog: sky density, WISE colours, magnitudes, predicted vs observed.")
    s.add_argument("catalog", help="catalog directory")
    s.add_argument("-o", "--output", default="plots", metavar="DIR", help="output directory (default plots/)")
    s.add_argument("--external", default=None,
                   help="table with observed W1-W4 (e.g. AllWISE) to crossmatch for predicted vs observed (default: "
                        "the catalog's own observed WISE, DESI flux_w1/flux_w2, where it has some)")
    s.add_argument("--radius", default="1.5",
                   help="crossmatch radius for --external, arcsec or with a unit (default 1.5)")
    s.add_argument("--ra-col", default=None, help="external RA column (default: guessed)")
    s.add_argument("--dec-col", default=None, help="external Dec column (default: guessed)")
    s.add_argument("--mag-system", choices=MAG_SYSTEMS, default="auto",
                   help="system of --external's magnitudes, as in crossmatch (default auto: from the column units)")
    s.add_argument("--order", type=int, default=None,
                   help="HEALPix order of the density map, 0-29 (default: from the data, 3-8)")

    s = add("train", "Fit the IR head (deep ensemble, calibrated sigma) and write encoder + head as a bundle.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", help="latents table: reference CSV (spender_0.., Z, reg, w1mpro.., w1sigmpro..) or "
                                     "catalogpred layout (latent_0.. or latent, z, norm, w1mpro..)")
    src.add_argument("--store", help="spectra store; with --photometry, latents are computed by the encoder")
    s.add_argument("--photometry", help="WISE photometry table (w1mpro..w4mpro, w1sigmpro.., or W1mag/e_W1mag, ...) "
                                        "for --store")
    s.add_argument("--mag-system", choices=MAG_SYSTEMS, default="auto",
                   help="system of the observed W1-W4 in --table/--photometry; AB is converted to Vega, the system "
                        "of the predictions (default auto: AB where a column's unit says mag(AB), else Vega)")
    s.add_argument("--join-on", default=None, help="id column shared by store and photometry (e.g. specobjid, targetid)")
    s.add_argument("--match-radius", default=None,
                   help="or: positional crossmatch radius, arcsec or with a unit (e.g. 1.5 or 0.05arcmin)")
    s.add_argument("--surveys", default=None,
                   help="with --store: comma-separated store groups to train on (default: every group on the "
                        "encoder's grid)")
    s.add_argument("--encoder", required=True, help="bundle whose encoder made (or makes) the latents")
    s.add_argument("-o", "--output", required=True, help="output bundle directory")
    s.add_argument("--members", type=int, default=5, help="ensemble members (default 5)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--name", default="catalogpred-ir", help="bundle name")
    s.add_argument("--version", dest="model_version", default="1", help="bundle version")
    s.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_cluster_args_only(s)

    s = add("models", "Model bundles: import published spender encoders, fetch them, evaluate heads.")
    msub = s.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    m = msub.add_parser("import-spender", help="spender checkpoint (.pt) -> encoder-only bundle",
                        description="Read a spender checkpoint (['model'] state dict with encoder.* keys) into a bundle.",
                        epilog="example:\n  catalogpred models import-spender spender.sdss.paperII-c273bb69.pt --survey sdss -o sdss_II/",
                        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[logging_opts])
    m.add_argument("checkpoint", help="spender checkpoint file (.pt), e.g. from `catalogpred models fetch`")
    m.add_argument("--survey", required=True, choices=("sdss", "desi"), help="grid the encoder was trained on")
    m.add_argument("-o", "--output", required=True, help="output bundle directory")
    m.add_argument("--name", default=None,
                   help="bundle name, the start of its model_id (default: spender-<checkpoint file name without .pt>)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing bundle at -o")
    m.add_argument("--allow-pickle", action="store_true", help="load non-tensor pickles (only for files you trust)")
    m = msub.add_parser("fetch", help="download a published spender checkpoint (needs a network)",
                        description="Download sdss_II or desi_edr_galaxy from the HuggingFace Hub ($HF_ENDPOINT, or "
                                    "https://huggingface.co); offline it fails at once and says where to put the file.",
                        epilog="example:\n  catalogpred models fetch sdss_II --dest checkpoints/",
                        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[logging_opts])
    m.add_argument("model", choices=("sdss_II", "desi_edr_galaxy"))
    m.add_argument("--dest", default="checkpoints", help="download directory (default checkpoints/)")
    m = msub.add_parser("evaluate", help="chi2_N, MAE, bias, coverage of a bundle's head on a latents table",
                        description="Evaluate a head on a table in the `train --table` layouts; writes a PNG and the card.",
                        epilog="example:\n  catalogpred models evaluate model/ heldout.csv --png eval.png",
                        formatter_class=argparse.RawDescriptionHelpFormatter, parents=[logging_opts])
    m.add_argument("bundle")
    m.add_argument("table")
    m.add_argument("--png", default=None, help="predicted vs observed plot with chi residuals")
    m.add_argument("--no-update-card", action="store_true", help="do not write the metrics into the card")
    m.add_argument("--mag-system", choices=MAG_SYSTEMS, default="auto",
                   help="system of the table's observed W1-W4, as in train (default auto)")

    s = add("info", "Summarise a catalog, a spectra store or a model bundle.")
    s.add_argument("path", help="catalog directory, store (.zarr) or model bundle directory")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")

    s = add("demo", "End to end on mock SDSS, DESI and PFS surveys (what `make demo` runs).")
    s.add_argument("--output", default="demo-output", help="output directory (default demo-output)")
    s.add_argument("--n-spectra", type=int, default=2000,
                   help=f"mock SDSS spectra to generate, at least {DEMO_MIN_SPECTRA} (default 2000)")
    s.add_argument("--surveys", default="sdss,desi,pfs",
                   help="mock surveys, comma-separated: sdss (always made: the demo trains its head on it), desi, "
                        "pfs (needs desi: PFS uses the DESI-grid bundle) (default all three)")
    s.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    s.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = add("submit", "Start Dask workers as SLURM/PBS batch jobs (dask-jobqueue) and run ingest or predict on them.")
    systems = s.add_subparsers(dest="system", required=True, metavar="SYSTEM")
    for name, label in (("slurm", "SLURM (sbatch)"), ("pbs", "PBS (qsub)")):
        q = systems.add_parser(name, help=f"workers as {label} jobs", description=f"Workers as {label} jobs, then run "
                               "`catalogpred ingest|predict` on them.", epilog=textwrap.dedent(EPILOGS["submit"]),
                               formatter_class=argparse.RawDescriptionHelpFormatter, parents=[logging_opts])
        q.add_argument("--jobs", type=int, required=True, help="batch jobs to submit (each starts its worker processes)")
        q.add_argument("--cores", type=int, default=None, help=f"cores per job (jobqueue.{name}.cores)")
        q.add_argument("--memory", default=None, help=f"memory per job, e.g. 64GB (jobqueue.{name}.memory)")
        q.add_argument("--processes", type=int, default=None,
                       help="worker processes per job (default: jobqueue's; with GPUs one per GPU)")
        q.add_argument("--walltime", default=None, help="job walltime, e.g. 02:00:00")
        q.add_argument("--queue", default=None, help="partition (SLURM) or queue (PBS)")
        q.add_argument("--account", default=None, help="account/project to charge")
        q.add_argument("--gpus-per-job", type=int, default=0, metavar="G",
                       help="GPUs per job: workers become `dask cuda worker --resources GPU=1`, one per GPU")
        q.add_argument("--config", default=None, metavar="YAML", help=f"dask-jobqueue config, e.g. deploy/{name}/jobqueue.yaml")
        q.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="export in the job script (repeatable)")
        q.add_argument("--wait-workers", type=int, default=None, metavar="N",
                       help="start the command once N workers are connected (default: all of them)")
        q.add_argument("--dry-run", action="store_true", help="print the job script and exit; submits nothing")
        q.add_argument("run_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                       help="the catalogpred command to run on the cluster (ingest or predict) with its arguments")
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
    handler._catalogpred = True  # replaced by the next call; other handlers (a host program's, pytest's) stay
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_catalogpred", False)] + [handler]
    root.setLevel(level)
    logging.getLogger("catalogpred").setLevel(logging.INFO if not quiet and verbose == 0 else level)
    if verbose == 0:
        logging.getLogger("catalogpred.tasks").setLevel(logging.WARNING)
    for noisy in ("distributed", "tornado", "asyncio", "numcodecs", "zarr"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)


def _dashboard_address(args) -> str | None:
    """The local cluster's dashboard address from ``--dashboard``/``--dashboard-address``, or None (none)."""
    address = getattr(args, "dashboard_address", None)
    return address or (DEFAULT_DASHBOARD if getattr(args, "dashboard", False) else None)


def _client(args, device: str = "cpu"):
    from .cluster import dask_client

    _quiet_dask(args)
    _warn_ignored_cluster_flags(args)
    return dask_client(args.workers, scheduler=args.scheduler, scheduler_file=args.scheduler_file,
                       wait_workers=args.wait_workers, device=device,
                       blocks_per_gpu=getattr(args, "blocks_per_gpu", BLOCKS_PER_GPU),
                       io_workers=getattr(args, "io_workers", 0),  # local clusters only, as --workers
                       workers_per_gpu=getattr(args, "workers_per_gpu", 1),
                       dashboard=_dashboard_address(args))


def _warn_ignored_cluster_flags(args) -> None:
    """Say which flags this run ignores: the local cluster's on an existing cluster, --wait-workers without one."""
    if args.scheduler or args.scheduler_file:
        local = [flag for flag, on in (("--workers", args.workers is not None),
                                       ("--io-workers", bool(getattr(args, "io_workers", 0))),
                                       ("--dashboard", bool(_dashboard_address(args))))
                 if on]
        if local:
            log.warning("%s: for the local cluster only, ignored with --scheduler/--scheduler-file (the existing "
                        "cluster's workers and dashboard are its own)", ", ".join(local))
    elif args.wait_workers is not None:
        log.warning("--wait-workers is for an existing cluster (--scheduler/--scheduler-file); the local cluster "
                    "starts its own workers")


def _progress(args):
    return False if args.no_progress else None


#: the classes SDSS (CLASS), DESI (SPECTYPE) and PFS redshift files give a spectrum
KNOWN_SPECTYPES = ("GALAXY", "QSO", "STAR")


def _read_options(args):
    import os

    from .surveys import ReadOptions, Selection

    spectypes = () if args.spectypes.lower() == "any" else tuple(t.strip().upper() for t in args.spectypes.split(","))
    unknown = [t for t in spectypes if t not in KNOWN_SPECTYPES]
    if unknown:
        log.warning("--spectypes %s: no survey here uses the class %s (SDSS CLASS, DESI SPECTYPE and PFS use %s): "
                    "no spectrum will match it", args.spectypes, ", ".join(unknown), ", ".join(KNOWN_SPECTYPES))
    if args.redshifts:
        from .redshifts import load_redshift_table

        load_redshift_table(args.redshifts)  # fail the run now, not every file later
    return ReadOptions(redshifts=os.path.abspath(args.redshifts) if args.redshifts else None,
                       selection=Selection(keep_sky=args.keep_sky, keep_unassigned=args.keep_unassigned,
                                           keep_bad_fiberstatus=args.keep_bad_fiberstatus, keep_zwarn=args.keep_zwarn,
                                           keep_fluxstd=args.keep_fluxstd, spectypes=spectypes))


def cmd_ingest(args) -> int:
    import os
    from collections import Counter

    from . import store
    from .cluster import shared_path
    from .pipeline import expand_inputs, run_ingest
    from .surveys import get_reader
    from .tasks import detect_survey

    # everything that can fail without workers fails before they start
    _check_ingest_args(args)
    store.check_store_target(args.store)
    runlock.check_not_written(shared_path(args.store))  # another ingest writing it: say so before a cluster starts
    paths = expand_inputs(args.inputs)
    if args.survey != "auto":
        get_reader(args.survey)
    options = _read_options(args)
    if args.dry_run:  # what each file is, read from its headers here
        stored = store.stored_inputs(args.store)  # path -> (group, only an unreadable_file reject)
        kinds, n_aux, n_done, n_rej = Counter(), 0, 0, 0
        for path in paths:
            _, name, n, rej = detect_survey(path)
            aux = bool(name and name.startswith("aux:"))
            kind = "redshifts" if aux else name if name else "reject: " + rej.split("\t", 1)[0]
            n_aux += aux
            n_done += (not aux) and path in stored
            n_rej += (not aux) and not name and path not in stored
            kinds[kind] += not aux
            where = ("" if path not in stored else "\tin the store only as an unreadable_file reject"
                     if stored[path][1] else "\talready in the store")
            print(f"{path}\t{kind}\t{'' if aux else n}{where}")
        log.info("dry run: %d spectra files (%s): %d would be ingested into %s (%d of them as whole-file rejects), "
                 "%d already there skipped; %d redshift-only file(s) would give redshifts", len(paths) - n_aux,
                 ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()) if v) or "none",
                 len(paths) - n_aux - n_done, args.store, n_rej, n_done, n_aux)
        return 0
    with _client(args) as client:
        summary = run_ingest(paths, args.store, client=client, survey=args.survey, shard_rows=args.shard_rows,
                             chunk_rows=args.chunk_rows, progress=_progress(args), options=options)
    if not args.quiet:
        print(summary.table(), file=sys.stderr)
    if args.strict and summary.rejected:
        raise CatalogpredError(f"--strict: {summary.rejected} spectra rejected (by reason: `catalogpred info "
                               f"{args.store}`)")
    return 0


def cmd_predict(args) -> int:
    from .cluster import check_workers_per_gpu, resolve_device
    from .pipeline import run_predict

    _check_predict_args(args)  # --order, --batch-size, --workers, ...: before anything is read
    # local cluster: auto -> cuda if NVML (no CUDA context) sees a GPU; an existing cluster: from its workers' resources
    local = not (args.scheduler or args.scheduler_file)
    device = resolve_device(args.device) if local else args.device
    check_workers_per_gpu(args.workers_per_gpu, device=device, local=local)  # as dask_client does, before a dry run

    from .cluster import check_scheduler_args, shared_path
    from .pipeline import check_catalog_target, plan_predict, predict_order

    # the plan reads the store and the bundles' bundle.json: a wrong path, or a survey without a bundle for its
    # grid, fails here, before a cluster starts
    check_scheduler_args(args.scheduler, args.scheduler_file)
    shared_path(args.catalog)  # says which URLs are not supported yet, and what to do instead
    surveys = args.surveys.split(",") if args.surveys else None
    plan = plan_predict(args.store, args.model, surveys)
    check_catalog_target(args.catalog, overwrite=args.overwrite, keep=[plan.store_path, *plan.bundle_paths])
    runlock.check_not_written(plan.store_path)  # an ingest writing the store, or a predict writing the catalog
    runlock.check_not_written(shared_path(args.catalog))
    for path, info in plan.infos.values():
        if info.card.kind == "demo":
            log.warning("%s is a DEMO bundle (%s): its encoder has random weights and its head was fitted on mock "
                        "surveys, so its predictions have no scientific value; see `catalogpred models --help` for a "
                        "real one", path, info.model_id)
    if args.dry_run:
        order, resumed = predict_order(args.catalog, plan.inputs, args.order, overwrite=args.overwrite, plan=plan)
        if resumed and args.order is not None and args.order != order:
            log.warning("--order %d would be ignored: %s is resumed at its order %d (--overwrite starts it again)",
                        args.order, args.catalog, order)
        print(json.dumps({**plan.summary(), "catalog": args.catalog, "order": order,
                          "resume": resumed, "device": device, "precision": args.precision,
                          "compile": args.compile, "io_workers": args.io_workers,
                          "workers_per_gpu": args.workers_per_gpu, "read_engine": args.read_engine,
                          "merge_leaves": args.merge}, indent=2))
        return 0
    with _client(args, device=device if local else "cpu") as client:
        summary = run_predict(args.store, args.model, args.catalog, client=client, overwrite=args.overwrite,
                              precision=args.precision, batch_size=args.batch_size, order=args.order,
                              torch_threads=args.torch_threads, progress=_progress(args), device=device,
                              surveys=surveys,
                              blocks_per_gpu=args.blocks_per_gpu, compile=args.compile, read_engine=args.read_engine,
                              merge=args.merge)
    if not args.quiet:
        print(summary.table(), file=sys.stderr)
        print(f"catalog written to {args.catalog}", file=sys.stderr)
    if args.strict and summary.rejects:
        raise CatalogpredError(f"--strict: {summary.rejects} spectra rejected"
                               + (f" ({summary.blocks_failed} blocks failed on every retry: predict_error)"
                                  if summary.blocks_failed else "") + f"; they are in {args.catalog}/rejects.parquet")
    if summary.blocks_failed:  # not bad data but a broken store or machine: a batch job must see it
        raise CatalogpredError(f"{summary.blocks_failed} prediction blocks failed on every retry; the catalog is "
                               f"finished without them (their spectra are predict_error rejects, the error in "
                               f"{args.catalog}/rejects.parquet's detail): fix the cause and re-run the same command "
                               "to retry them")
    return 0


#: rows shown on a terminal when no --limit is given
TTY_ROWS = 50


def _coordinate(text: str, sexagesimal: str) -> float:
    """RA (``sexagesimal="hourangle"``) or Dec (``"deg"``) in degrees (:func:`catalogpred.query.coordinate_value`)."""
    from .query import coordinate_value

    return coordinate_value(text, "ra" if sexagesimal == "hourangle" else "dec")


def _keep_coordinates_as_values(argv: list[str]) -> list[str]:
    """argparse takes a value such as '-07:02:55' (a southern Dec) for an option; with a trailing space it is a
    value again (:func:`_coordinate` strips it). Applies to the two tokens after ``--cone``."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--cone":
            for j in (i + 1, i + 2):
                if j < len(out) and out[j].startswith("-") and out[j][1:2].isdigit():
                    out[j] += " "
    return out


def _angle(text: str, unit: str, name: str = "radius") -> float:
    """A number in ``unit``, or a value with its own unit ('1deg', '30arcmin', '2.5 arcsec', "10'")
    (:func:`catalogpred.query.angle_value`)."""
    from .query import angle_value

    return angle_value(text, unit, name)


def _emit(table, args) -> None:
    """Data to stdout (aligned table on a terminal, CSV when piped) or to the -o file."""
    from .query import format_table, write_table

    if args.output:
        write_table(table, args.output, overwrite=args.overwrite)
        log.info("%d rows written to %s", table.num_rows, args.output)
        return
    tty = sys.stdout.isatty()
    fmt = args.format if args.format != "auto" else ("table" if tty else "csv")
    if fmt == "table":
        n = table.num_rows if args.limit is not None or not tty else min(table.num_rows, TTY_ROWS)
        print(format_table(table, n))
        if n < table.num_rows:
            log.info("%d of %d rows shown; --limit N for more, pipe or -o for all", n, table.num_rows)
    else:
        write_table(table, sys.stdout, ".csv")


def cmd_query(args) -> int:
    from .errors import CatalogError
    from .query import open_catalog

    q = open_catalog(args.catalog)
    if args.cone:
        q = q.cone(_coordinate(args.cone[0], "hourangle"), _coordinate(args.cone[1], "deg"),
                   _angle(args.cone[2], "arcsec", "--cone radius"))
    if args.box:
        q = q.box(*args.box)
    if args.id:
        q = q.id(args.id)
    for w in args.where:
        q = q.where(w)
    if args.columns and not args.sql:  # with --sql, --columns picks from the SQL result
        q = q.select(args.columns)
    if (args.excess_only or args.excess_threshold != 3.0) and not args.ir_excess:
        raise ConfigError("--excess-only and --excess-threshold go with --ir-excess")
    if args.sql:
        if args.ir_excess:
            raise ConfigError("--ir-excess and --sql do not combine; export the --ir-excess rows (-o t.parquet) "
                              "and query that file with DuckDB")
        table = q.sql(args.sql)
        if args.columns:
            table = _result_columns(table, args.columns)
        if args.limit is not None:
            table = table.slice(0, args.limit)
    elif args.ir_excess:
        table = _with_ir_excess(q, args)
    else:
        table = (q.limit(args.limit) if args.limit is not None else q).to_arrow()
        cuts = bool(q.regions or q.filters)
        if args.id and table.num_rows == 0:
            rejected = _rejected_ids(args.catalog, args.id)
            examples = "" if cuts or rejected else _example_ids(args.catalog, exclude=args.id)
            raise CatalogError(f"no row with source_id {', '.join(args.id)} in {args.catalog}"
                               + (" within the --cone/--box/--where cuts" if cuts else "")
                               + (f"; in its rejects.parquet: {rejected}" if rejected else "")
                               + (f"; ids in it look like {examples}" if examples else ""))
        if args.id and not cuts and args.limit is None and "source_id" in table.column_names:
            missing = sorted(set(args.id) - set(table.column("source_id").to_pylist()))
            if missing:
                rejected = _rejected_ids(args.catalog, missing)
                log.warning("no catalog row for %s%s", ", ".join(missing),
                            f" (in its rejects.parquet: {rejected})" if rejected else "")
    _emit(table, args)
    return 0


def _rejected_ids(catalog: str, ids) -> str:
    """The reject reasons of those ``ids`` that are in the catalog's rejects.parquet, as text ("" if none)."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(catalog) / "rejects.parquet"
    if not path.exists():
        return ""
    rej = pq.read_table(path, columns=["source_id", "reason"])
    rej = rej.filter(pc.is_in(rej.column("source_id"), pa.array(list(ids), pa.string())))
    return ", ".join(f"{i} ({r})" for i, r in zip(rej.column("source_id").to_pylist(), rej.column("reason").to_pylist()))


def _example_ids(catalog: str, exclude=(), n: int = 3) -> str:
    """The first ``n`` source_id values of the catalog (not those in ``exclude``), for an error message."""
    from .query import open_catalog

    ids = open_catalog(catalog).select("source_id").limit(n + len(exclude)).to_arrow().column("source_id").to_pylist()
    return ", ".join([i for i in ids if i not in set(exclude)][:n])


def _result_columns(table, columns: str):
    """``query --sql ... --columns a,b``: those columns of the SQL result."""
    from .query import check_column_list

    cols = list(check_column_list(columns))
    unknown = [c for c in cols if c not in table.column_names]
    if unknown:
        raise ConfigError(f"--columns {','.join(unknown)}: not in the --sql result (with --sql, --columns picks from "
                          f"the result's columns: {', '.join(table.column_names)})")
    return table.select(cols)


def _with_ir_excess(q, args):
    """``query --ir-excess``: the rows of ``q`` with :func:`~catalogpred.crossmatch.ir_excess`'s columns from the
    catalog's own observed photometry (read as well, shown only if selected)."""
    from .crossmatch import query_ir_excess

    return _excess_rows(query_ir_excess(q, excess_threshold=args.excess_threshold), args)


def _excess_rows(table, args):
    """A table with ``ir_excess``: the count flagged logged, then ``--excess-only`` and ``--limit`` applied."""
    import pyarrow.compute as pc

    flagged = pc.fill_null(table.column("ir_excess"), False)
    log.info("%d of %d rows flagged ir_excess (> %g sigma in any band)", pc.sum(flagged).as_py() or 0,
             table.num_rows, args.excess_threshold)
    if args.excess_only:
        table = table.filter(flagged)
    return table.slice(0, args.limit) if args.limit is not None else table


def cmd_crossmatch(args) -> int:
    from .crossmatch import crossmatch
    from .errors import ConfigError
    from .query import open_catalog

    q = open_catalog(args.catalog)
    for w in args.where:
        q = q.where(w)
    radius = _angle(args.radius, "arcsec", "--radius")
    table = crossmatch(q, args.external, radius_arcsec=radius, ra_col=args.ra_col, dec_col=args.dec_col,
                       columns=args.columns, excess_threshold=args.excess_threshold, keep_unmatched=args.keep_unmatched,
                       mag_system=args.mag_system)
    if "ir_excess" in table.column_names:
        table = _excess_rows(table, args)
    elif args.excess_only:
        raise ConfigError(f"--excess-only needs observed W1-W4 with errors in {args.external} "
                          "(columns like w1mpro/w1sigmpro or w1_mag/w1_mag_err)")
    elif args.limit is not None:
        table = table.slice(0, args.limit)
    _emit(table, args)
    return 0


def cmd_plot(args) -> int:
    from .plots import plot_catalog

    radius = _angle(args.radius, "arcsec", "--radius")
    for path in plot_catalog(args.catalog, args.output, external=args.external, radius_arcsec=radius,
                             ra_col=args.ra_col, dec_col=args.dec_col, order=args.order, mag_system=args.mag_system):
        print(path)
    return 0


def cmd_train(args) -> int:
    from .model.train import read_training_table, train_bundle

    import os

    from .model.bundle import read_bundle_info

    _check_at_least(args, 1, "--members", "--workers")
    progress = not args.no_progress and sys.stderr.isatty()
    read_bundle_info(args.encoder)  # before any work: the encoder exists, and the output may be written
    if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)) and not args.overwrite:
        raise ConfigError(f"{args.output} exists; choose another -o or pass --overwrite")
    if args.table:
        given = [o for o, v in (("--photometry", args.photometry), ("--join-on", args.join_on),
                                ("--match-radius", args.match_radius), ("--surveys", args.surveys)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} go with --store; --table holds the latents and photometry itself")
        data = read_training_table(args.table, args.mag_system)
        source = args.table
    else:
        if not args.photometry or not (args.join_on or args.match_radius):
            raise ConfigError("--store needs --photometry and --join-on COLUMN or --match-radius ARCSEC")
        from .pipeline import training_table_from_store

        args.wait_workers = None
        with _client(args) as client:
            data = training_table_from_store(args.store, args.photometry, args.encoder, client=client,
                                             join_on=args.join_on, match_radius_arcsec=None if args.match_radius
                                             is None else _angle(args.match_radius, "arcsec", "--match-radius"),
                                             mag_system=args.mag_system,
                                             surveys=args.surveys.split(",") if args.surveys else None)
        source = f"{args.store} x {args.photometry}"
    info, metrics = train_bundle(data, args.encoder, args.output, n_members=args.members, seed=args.seed, name=args.name,
                                 version=args.model_version, source=source, overwrite=args.overwrite, progress=progress)
    print(json.dumps({"model_id": info.model_id, "bundle": args.output, "metrics": metrics}, indent=2))
    return 0


def cmd_models(args) -> int:
    if args.models_command == "import-spender":
        from .model.spender_import import import_spender

        info = import_spender(args.checkpoint, args.survey, args.output, name=args.name, overwrite=args.overwrite,
                              allow_pickle=args.allow_pickle)
        print(json.dumps({"model_id": info.model_id, "bundle": args.output, "grid": info.grid.name,
                          "n_latent": info.n_latent}, indent=2))
    elif args.models_command == "fetch":
        from .model.spender_import import fetch_published

        print(fetch_published(args.model, args.dest))
    else:
        from .model.train import evaluate_bundle, read_training_table

        if args.png:
            from pathlib import Path

            from .query import _check_destination  # a missing directory: one line, before the work
            _check_destination(Path(args.png), overwrite=True)
        metrics = evaluate_bundle(args.bundle, read_training_table(args.table, args.mag_system), png=args.png,
                                  update_card=not args.no_update_card)
        print(json.dumps(metrics, indent=2))
    return 0


def cmd_info(args) -> int:
    from pathlib import Path

    path = Path(args.path)
    if (path / "bundle.json").exists():  # a model bundle: its card (model_card validates bundle.json)
        from .model.bundle import model_card

        card = model_card(path)
        print((path / "bundle.json").read_text().rstrip() if args.json else card.rstrip())
        return 0
    if (path / "meta").is_dir() and (path.parent / "zarr.json").exists():  # one survey group of a store
        raise ConfigError(f"{path} is the {path.name} group of the store {path.parent}; "
                          f"`catalogpred info {path.parent}` describes every group")
    if (path / "zarr.json").exists() and not (path / "hats.properties").exists():  # a spectra store
        from .store import format_store_info as fmt
        from .store import store_info as describe
    elif path.is_dir():
        from .query import catalog_info as describe
        from .query import format_info as fmt
    else:
        raise ConfigError(f"{path}: " + ("a file, not a directory" if path.exists() else "no such directory")
                          + "; info takes a catalog, a store (.zarr) or a model bundle")
    info = describe(path)
    print(json.dumps(info, indent=2, default=str) if args.json else fmt(info))
    return 0


def cmd_demo(args) -> int:
    _check_at_least(args, DEMO_MIN_SPECTRA, "--n-spectra")
    _check_at_least(args, 1, "--workers")
    from .demo import run_demo  # it checks --surveys and --output before any work

    _quiet_dask(args)
    run_demo(args.output, n_spectra=args.n_spectra, seed=args.seed, n_workers=args.workers,
             surveys=args.surveys.split(","), progress=False if args.no_progress else None)
    return 0


def cmd_submit(args) -> int:
    from .submit import run_submit

    _quiet_dask(args)
    return run_submit(args)


COMMANDS = {"ingest": cmd_ingest, "predict": cmd_predict, "query": cmd_query, "info": cmd_info, "demo": cmd_demo,
            "crossmatch": cmd_crossmatch, "plot": cmd_plot,
            "submit": cmd_submit, "train": cmd_train, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_keep_coordinates_as_values(sys.argv[1:] if argv is None else argv))
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
    except BrokenPipeError:  # `catalogpred query … | head`: the reader closed the pipe, having what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141  # 128 + SIGPIPE: what a shell reports for a command that the closed pipe ended


if __name__ == "__main__":
    sys.exit(main())
