#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the daemon in the foreground.
#   bash scripts/run.sh                      serve config.toml's model (ModelScope download on first use)
#   ONDEMAND_MODEL=/path/to/model bash scripts/run.sh    serve a local model directory (or an id)
#   ONDEMAND_MODEL=test bash scripts/run.sh  generate a RANDOM-weight plus_large test model first
#                                            (offline trials; its predictions mean nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=${ONDEMAND_MODEL:-}
if [ "$model" = "test" ]; then
  model=var/test-model
  [ -f "$model/model.pt" ] || .venv/bin/ondemand make-test-model "$model" --preset plus_large
fi
exec .venv/bin/ondemand serve --config "${ONDEMAND_CONFIG:-config.toml}" ${model:+--model "$model"}
