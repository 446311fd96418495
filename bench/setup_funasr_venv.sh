#!/usr/bin/env bash
# Create the separate FunASR baseline venv used by bench/funasr_bench.py (git-ignored).
#   bash bench/setup_funasr_venv.sh            -> .venv-funasr
#   FUNASR_VENV=/path bash bench/setup_funasr_venv.sh
#   FUNASR_LOOSE=1 bash bench/setup_funasr_venv.sh   (funasr==1.4.16 soundfile soxr, unpinned deps)
# torch is the CPU build 2.13.0 and goes in FIRST: FunASR's requirements do not list torch, so
# nothing later replaces it; an unpinned `pip install torch` on Linux would pull GBs of CUDA.
# torchaudio is NOT needed: funasr 1.4.16 imports it optionally and otherwise reads audio with
# soundfile (channels averaged) and resamples with librosa.resample (res_type soxr_hq), which is
# exactly the reference behaviour the golden fixture was made with.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FUNASR_VENV:-.venv-funasr}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # Take the default resolution only if it is a CPU build (a local +cpu wheel, as on our
  # machines); otherwise ask PyTorch's CPU index.
  resolved=$("$venv/bin/python" -m pip install --disable-pip-version-check -q --dry-run \
             --no-deps --report - "torch==2.13.0" 2>/dev/null | "$venv/bin/python" -c \
             'import json,sys; r=json.load(sys.stdin)["install"]; print(r[0]["metadata"]["version"] if r else "")' \
             2>/dev/null || true)
  case "$resolved" in
    *+cpu) "${pip[@]}" "torch==2.13.0" ;;
    *) "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" ;;
  esac
fi

if [ -n "${FUNASR_LOOSE:-}" ]; then
  "${pip[@]}" "funasr==1.4.16" soundfile soxr
else
  "${pip[@]}" -r bench/requirements-funasr.txt   # the exact set the published figures used
fi
"$venv/bin/python" - <<'PY'
import torch, funasr
from funasr import AutoModel  # noqa: F401
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print(f"funasr venv ready: funasr {funasr.__version__}, torch {torch.__version__}")
PY
