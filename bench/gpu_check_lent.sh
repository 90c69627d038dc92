#!/usr/bin/env bash
# `make gpu-check` on a GPU machine that reaches no package index and has its own torch (a lent machine):
# the wheels of .gpu-bundle/ (`make gpu-bundle`, here, first) are installed without dependencies into a virtual
# environment layered over the machine's packages, then bench/gpu_check.py runs in it. The JSON and the log go
# to $OUT (the device tool's result folder), else runs/gpu-check. Exit: gpu_check's (0 ok, 1 a stage failed,
# 2 no CUDA or no bundle).
#
#   bash bench/gpu_check_lent.sh        # defaults: BUNDLE=.gpu-bundle BUDGET_S=450 PYTHON=python3 (the machine's)
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-.gpu-bundle}
RESULTS=${OUT:-runs/gpu-check}
BUDGET_S=${BUDGET_S:-450}
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/orpo-gpu-check-venv}
mkdir -p "$RESULTS"

if [ ! -f "$BUNDLE/manifest.json" ]; then
    echo "gpu-check: no $BUNDLE/manifest.json: run 'make gpu-bundle' where there is a network, and carry $BUNDLE"
    exit 2
fi
# The bundle's orpo-tune wheel must be this tree's: refuse a stale one (its sources' SHA-256 is in the manifest).
if ! $PY - "$BUNDLE" <<'EOF'
import json, sys
sys.path.insert(0, "bench")
from gpu_bundle import source_digest
manifest = json.load(open(sys.argv[1] + "/manifest.json"))
if manifest["project"]["source_sha256"] != source_digest():
    sys.exit(f"gpu-check: {sys.argv[1]} was built from other orpo_cli sources than this tree's: run 'make gpu-bundle' again")
EOF
then exit 2; fi

# A venv made from inside another venv (this machine's python3 is /opt/torch/.venv's) sees the base
# interpreter's packages, not that venv's: --system-site-packages, and the machine's site-packages by a .pth.
# Without the venv module: the wheels in a folder of their own, put first on PYTHONPATH.
rm -rf "$VENV"
if $PY -m venv --system-site-packages --without-pip "$VENV"; then
    RUN_PY="$VENV/bin/python"
    SITE=$("$RUN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    $PY -c 'import site; print("\n".join(site.getsitepackages()))' > "$SITE/_machine_site_packages.pth"
else
    echo "gpu-check: no venv module in $PY: installing the wheels into $VENV/site on PYTHONPATH instead"
    RUN_PY=$PY
    SITE="$VENV/site"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
    "$BUNDLE"/wheels/*.whl || exit 2

export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 ORPO_TUNE_CACHE=${ORPO_TUNE_CACHE:-/tmp/orpo-tune-cache}
"$RUN_PY" bench/gpu_check.py --bundle "$BUNDLE" --out "$RESULTS" --workdir /tmp/orpo-gpu-check \
    --budget-s "$BUDGET_S" "$@" 2>&1 | tee "$RESULTS/gpu-check.log"
