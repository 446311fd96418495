#!/usr/bin/env bash
# Download, here, the wheels the GPU check needs on the GPU machine that its image lacks
# (/work/.library/device/README.md: Python 3.12 there, torch, aiohttp, numpy, psutil,
# nvidia-ml-py, prometheus-client, pyyaml and python-dateutil are already installed; nothing can
# be fetched there).  Run from the repository root of the checkout the device tool sends; the
# wheels land in .whl/ (ignored through .git/info/exclude) and travel with `carry: [".whl"]`.
# About 1.9 MB.  Exact versions: the ones this project's venv resolves (scripts/setup.sh).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl \
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0 croniter==7.0.0
ls -l .whl
