#!/usr/bin/env bash
# The test command of the README: install what the tests need, then run the whole offline suite.
#   bash tests/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt -e . 2>&1 | grep -v -E "^WARNING: Running pip as the 'root'|^\[notice\]" || true
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
