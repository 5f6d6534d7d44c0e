"""`make bench`: run every benchmark in bench/ and print one table (and bench-output/results.json).

    python bench/run.py           # full (each part < 10 min on 2 cores)
    python bench/run.py --quick   # smoke run (CI-sized)
    python bench/run.py --only model,ingest

Every row is measured against its baseline in the same run; "pass" compares with the issue's target.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

PARTS = ["model", "ingest", "pipeline", "query"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke runs")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default: {','.join(PARTS)})")
    args = p.parse_args(argv)
    from _table import format_rows

    rows, failed = [], []
    for part in args.only.split(","):
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"bench_{part}")
        except ModuleNotFoundError as exc:
            print(f"[bench] {part}: not available ({exc})", file=sys.stderr)
            continue
        print(f"[bench] {part} ...", file=sys.stderr, flush=True)
        try:
            part_rows = mod.run(args.quick)
        except Exception:  # noqa: BLE001 - report and continue with the other parts
            failed.append(part)
            traceback.print_exc()
            continue
        for r in part_rows:
            r["part"] = part
        rows += part_rows
        print(f"[bench] {part}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(format_rows(rows))
    out = REPO / "bench-output"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(f"\n(results in {out / 'results.json'})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
