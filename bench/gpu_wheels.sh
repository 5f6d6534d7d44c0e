#!/usr/bin/env bash
# Wheels for a GPU machine that has Python 3.12, a CUDA torch and CuPy but not catalogpred's other dependencies
# and no package index (the device machines): catalogpred's own wheel plus every dependency of '.[gpu]' that
# the machine's image lacks, resolved here against constraints.txt's pins (torch left out: the machine's stays).
#
#   bash bench/gpu_wheels.sh [DIR] [IMAGE_PACKAGES]   # DIR default .whl; IMAGE_PACKAGES default bench/gpu_image_packages.txt
#   LEAVE="duckdb bokeh xyzservices" bash bench/gpu_wheels.sh   # packages not to fetch (the default: 31 MB that
#                                                                # only query --sql and Dask's dashboard import)
#
# bench/gpu_check.sh installs DIR's wheels first when DIR is .whl. Prints the wheels and their total size
# (the device tool carries 64 MiB in all, with anything else a run needs, e.g. a model bundle).
set -euo pipefail
dir=${1:-.whl}
image=${2:-bench/gpu_image_packages.txt}
py=${PYTHON:-python3}
plat=(--python-version 3.12 --implementation cp --only-binary=:all:)
for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dir"
# one version of each package (two stop the install there): start from no wheels, in our own .whl/ only
if compgen -G "$dir/*.whl" > /dev/null; then
    if [ "$dir" = .whl ]; then rm -f .whl/*.whl; else echo "$dir holds wheels already; give an empty DIR" >&2; exit 1; fi
fi
# the requirements of '.[gpu]' without torch, from pyproject.toml
"$py" - "$work/req.txt" <<'PY'
import re, sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = p["dependencies"] + p["optional-dependencies"]["gpu"]
open(sys.argv[1], "w").write("\n".join(r for r in reqs if re.split(r"[<>=!\[ ;]", r)[0] != "torch") + "\n")
PY
grep -v '^torch' constraints.txt > "$work/constraints.txt"
"$py" -m pip install --dry-run --ignore-installed --quiet --disable-pip-version-check --report "$work/report.json" \
    "${plat[@]}" --target "$work/t" -r "$work/req.txt" -c "$work/constraints.txt" 2> >(grep -v '^WARNING: Location' >&2)
# what the image lacks (CUDA libraries and torch never travel: the image has its own)
"$py" - "$work/report.json" "$image" "${LEAVE-duckdb bokeh xyzservices}" > "$work/need.txt" <<'PY'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n.lower())
have = {norm(l.strip()) for l in open(sys.argv[2]) if l.strip() and not l.startswith("#")}
have |= {norm(n) for n in sys.argv[3].split()}
for item in json.load(open(sys.argv[1]))["install"]:
    name = norm(item["metadata"]["name"])
    if name not in have and not name.startswith(("nvidia-", "cuda-", "torch")):
        print(f"{name}=={item['metadata']['version']}")
PY
"$py" -m pip download --quiet --disable-pip-version-check --no-deps "${plat[@]}" -d "$dir" -r "$work/need.txt" \
    2> >(grep -v '^WARNING: Location' >&2)
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$dir" . \
    2> >(grep -v '^WARNING: Location' >&2)
ls -1 "$dir"
du -ch "$dir"/*.whl | tail -1
