"""Orchestration on Dask: plan the work, submit tasks with bounded concurrency, show progress, summarise.

- :mod:`.ingest`: :func:`run_ingest`, input files → store shards (one task per shard), then the duplicate-id
  check and the per-file row check.
- :mod:`.predict`: :func:`run_predict`, store shards → catalog blocks (one task per shard), then finalize.
- :mod:`.merge`: each HEALPix leaf's part files merged into one file, one task per leaf: as soon as the leaf's last
  block is done (:class:`~.merge.LeafMerger`), and after the last block for what is left (:func:`merge_leaves`).
- :mod:`.training`: :func:`training_table_from_store`, latents on the cluster joined to WISE photometry.
- :mod:`.runner`: what they share: the bounded task window with its progress bar (:func:`run_bounded`).

Both runs are resumable: ingest skips the spectra already in finished shards; predict skips blocks with a done
marker. Tasks are the functions in :mod:`catalogpred.tasks`: one per shard (with ``--io-workers``, a prediction
block is a chain of three: read, model, write). At most two per task slot of the connected workers are in
flight (:func:`run_bounded`; a GPU worker has ``--blocks-per-gpu`` slots), so memory stays bounded for any
store size.
"""
from .ingest import (FITS_PATTERNS, IngestSummary, _FileRows, expand_inputs, missing_ranges, plan_pieces,  # noqa: F401
                     plan_ranges, run_ingest)
from .merge import merge_leaves  # noqa: F401
from .predict import (DEFAULT_BATCH, PredictPlan, PredictSummary, check_catalog_target, plan_predict,  # noqa: F401
                      predict_order, run_predict)
from .runner import PipelineError, n_workers, run_bounded  # noqa: F401
from .training import training_table_from_store  # noqa: F401

__all__ = ["expand_inputs", "run_ingest", "run_predict", "plan_predict", "PredictPlan", "IngestSummary",
           "PredictSummary", "PipelineError", "training_table_from_store", "check_catalog_target", "predict_order",
           "DEFAULT_BATCH", "run_bounded", "merge_leaves"]
