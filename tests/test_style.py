"""The tree stays in one style: `ruff check` and `ruff format --check` (pyproject.toml) pass.

Fix a failure with `ruff check --fix . && ruff format .` from the repository root.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('args', [['check', '--output-format', 'concise'], ['format', '--check']])
def test_ruff(args):
  proc = subprocess.run(
    [sys.executable, '-m', 'ruff', *args, '.'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, f'ruff {" ".join(args)}:\n{proc.stdout[-5000:]}{proc.stderr[-2000:]}'
