#!/usr/bin/env bash
# Create (or update) the virtual environment with the right torch build, then ondemand itself.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    plus the test/lint tools and ray[serve] (the cluster extra)
# Environment knobs:
#   ONDEMAND_VENV         where the venv goes (default .venv)
#   ONDEMAND_TORCH_SPEC   pip requirement for torch (default: CUDA build on NVIDIA machines,
#                         torch==2.13.0 CPU build elsewhere)
#   ONDEMAND_TORCH_INDEX  pip index to take torch from (e.g. https://download.pytorch.org/whl/cu126)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ONDEMAND_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)

if ! "$py" -c "import torch" 2>/dev/null; then
  index=${ONDEMAND_TORCH_INDEX:-}
  if [ -n "${ONDEMAND_TORCH_SPEC:-}" ]; then
    spec=$ONDEMAND_TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch"            # PyPI's Linux wheel is the CUDA build: what a GPU box wants
  else
    spec="torch==2.13.0"    # CPU-only machine: never pull GBs of CUDA libraries
    if [ -z "$index" ]; then
      # Take the default resolution only when it is a CPU build (a local +cpu wheel, as on our
      # build machines); otherwise ask PyTorch's CPU index.
      resolved=$("$py" -m pip install --disable-pip-version-check -q --dry-run --no-deps \
                 --report - "$spec" 2>/dev/null | "$py" -c \
                 'import json,sys; r=json.load(sys.stdin)["install"]; print(r[0]["metadata"]["version"] if r else "")' \
                 2>/dev/null || true)
      case "$resolved" in *+cpu) ;; *) index="https://download.pytorch.org/whl/cpu" ;; esac
    fi
  fi
  echo "setup: installing $spec${index:+ from $index}"
  "${pip[@]}" ${index:+--index-url "$index"} "$spec"
fi

if [ "${1:-}" = "--dev" ]; then
  # cluster: ray[serve] for tests/test_cluster_ray.py (a 79 MB wheel; about 15 s to install)
  "${pip[@]}" -e ".[dev,cluster]"
else
  "${pip[@]}" -e .
fi
echo "setup: ready ($("$py" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
