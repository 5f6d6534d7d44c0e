#!/usr/bin/env bash
# Entry point of the catalogpred image.
#
#   <image> predict --store ... --scheduler tcp://...   -> catalogpred predict ...   (the default: catalogpred)
#   <image> --help | --version                          -> catalogpred --help
#   <image> dask scheduler ... / dask worker ...        -> run as given (any other executable too)
#   <image> dask cuda worker ...                        -> dask cuda worker ...
#   <image> "dask cuda worker" tcp://sched:8786 ...     -> dask cuda worker tcp://sched:8786 ...
#   <image> dask-<sub>[-<sub>] ...                      -> dask <sub> [<sub>] ...
#
# The last two forms exist for charts that pass the worker command as one argument (the dask
# Helm chart's worker.image.dask_worker value) or still use the legacy one-word executable names,
# which distributed >= 2026.6 no longer installs: they are rewritten to the `dask <subcommand>` CLI.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    exec catalogpred --help
fi
first=$1
shift
case $first in
    *" "*)                                   # "dask cuda worker" given as one argument
        read -r -a words <<<"$first"
        exec "${words[@]}" "$@" ;;
    dask-*)                                  # legacy one-word name: dask-x-y -> dask x y
        read -r -a words <<<"${first//-/ }"
        exec "${words[@]}" "$@" ;;
    -*|ingest|predict|query|crossmatch|plot|info|train|models|demo|submit)
        exec catalogpred "$first" "$@" ;;
    *)
        exec "$first" "$@" ;;
esac
