#!/usr/bin/env bash
# The tests: set up (with the [test] and [reference] extras), then run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k quantizer
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,reference
source scripts/malloc.sh
# Two workers, one test file each at a time (a file's module-scoped fixtures are built once):
# compiling is single-threaded, so two files compile side by side on a 2-core machine.
# Files are handed out in collection order, longest first (tests/conftest.py, FILE_SECONDS).
exec .venv/bin/python -m pytest -q -n "${VQGAN_JAX_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
