#!/usr/bin/env bash
# One run on the GPU machine (no network), from a copy of the repository:  bash benchmarks/run_gpu.sh [--tiny ...]
# 1. installs .whl/*.whl (diffusers, open_clip_torch, ftfy, wcwidth) into $SITE and puts it and the repo on
#    PYTHONPATH; 2. installs from .whl/opt/ only the modules this machine lacks (requests and its dependencies,
#    which diffusers imports; torchvision, for torch 2.11.0+cu130); 3. runs benchmarks/bench_gpu.py under a hard
#    timeout. Results: stdout, and $OUT/bench_gpu.md + $OUT/bench_gpu.json when $OUT is set.
# PY (default python3), SITE (default /tmp/site) and BENCH_TIMEOUT (default 285 s) are for local checks.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
t0=$(date +%s)
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  && export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
missing=$($PY - <<'EOF'
import importlib.util
for name in ("requests", "urllib3", "idna", "certifi", "charset_normalizer", "torchvision"):
    try:
        found = importlib.util.find_spec(name) is not None
    except Exception:
        found = False
    if not found:
        print(name)
EOF
)
if [ -n "$missing" ]; then
  echo "run_gpu.sh: installing from .whl/opt: $(echo $missing)"
  for m in $missing; do  # one at a time: a wheel that does not fit leaves the others installed
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/opt/"$m"-*.whl
  done
fi
echo "run_gpu.sh: setup $(( $(date +%s) - t0 )) s; PYTHONPATH=${PYTHONPATH-}"
timeout -k 20 "${BENCH_TIMEOUT:-285}" $PY benchmarks/bench_gpu.py "$@"
rc=$?
echo "run_gpu.sh: exit $rc after $(( $(date +%s) - t0 )) s"
exit $rc
