#!/usr/bin/env bash
# The tests: set up (with the [test] and [reference] extras), then run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k quantizer
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,reference
exec .venv/bin/python -m pytest -q "$@"
