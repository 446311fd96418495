#!/usr/bin/env bash
# Set up the dev environment and run every check: ruff, mypy, the whole pytest suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
py=${ONDEMAND_VENV:-.venv}/bin/python
"$py" -m ruff check ondemand tests bench scripts
"$py" -m mypy
"$py" -m pytest "$@"
