#!/usr/bin/env bash
# The GPU check on the GPU machine, in one device-tool call (bench/README.md, "GPU check"):
#   run(command="bash bench/gpu_check/run.sh", carry=[".whl"], timeout_s=480)
# after `bash bench/gpu_check/wheels.sh` here.  Installs the carried wheels into /tmp/site, then
# runs bench/gpu_check/run.py on cuda with a 380 s budget (no section starts after it; the one
# running may overrun it by a compile or a ladder sample, and `timeout 460` bounds the whole);
# results in $OUT (gpu_check.json, gpu_check.md, gpu_check.log).  Extra arguments go to run.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,persistence_mode --format=csv || true
timeout 460 python3 bench/gpu_check/run.py --device cuda --budget-s 380 "$@"
rc=$?
cat "${OUT:-bench/out/gpu_check}/gpu_check.md" 2>/dev/null || true
exit $rc
