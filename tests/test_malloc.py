"""vqgan_jax.malloc names the malloc a process runs on (rows record it; main hints on glibc)."""

import os
import subprocess
import sys

import pytest

from vqgan_jax import malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROBE = 'from vqgan_jax import malloc; print(malloc.name())'


def _tcmalloc_path():
  out = subprocess.run(
    ['bash', '-c', 'source scripts/malloc.sh; echo "${LD_PRELOAD:-}"'],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'},
  )
  return out.stdout.strip()


def test_names_the_mapped_library(tmp_path):
  maps = tmp_path / 'maps'
  libc = '7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n'
  maps.write_text(libc)
  assert malloc.name(str(maps)) == 'glibc'
  maps.write_text(libc + '7f20-7f30 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.10\n')
  assert malloc.name(str(maps)) == 'tcmalloc'
  assert malloc.name(str(tmp_path / 'absent')) == 'unknown'


def _probe(env):
  proc = subprocess.run(
    [sys.executable, '-c', _PROBE], cwd=REPO, capture_output=True, text=True, env=env, timeout=60
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip()


def test_a_real_process_on_glibc_and_on_the_scripts_tcmalloc():
  """A process without LD_PRELOAD reads 'glibc'; one with what scripts/malloc.sh preloads reads
  'tcmalloc' (skipped where TCMalloc is not installed: scripts/setup.sh installs it on Debian)."""
  env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
  if sys.platform != 'linux':
    pytest.skip('reads /proc/self/maps')
  assert _probe(env) == 'glibc'
  lib = _tcmalloc_path()
  if not lib:
    pytest.skip('libtcmalloc_minimal.so.4 is not installed')
  assert _probe({**env, 'LD_PRELOAD': lib}) == 'tcmalloc'


def test_the_scripts_survive_a_machine_without_ldconfig(tmp_path):
  """demo.sh and test.sh source scripts/malloc.sh under `set -euo pipefail`: where no ldconfig
  answers (another OS, a minimal image) it must leave LD_PRELOAD alone, not end the script."""
  lookup = open(os.path.join(REPO, 'scripts', 'tcmalloc_path.sh')).read()
  assert lookup.count('ldconfig -p') == 2, 'update this test with the script'
  no_ldconfig = lookup.replace('/sbin/ldconfig -p', '/nonexistent/ldconfig -p').replace(
    'ldconfig -p 2>/dev/null ||', 'no-such-ldconfig -p 2>/dev/null ||', 1
  )
  (tmp_path / 'tcmalloc_path.sh').write_text(no_ldconfig)
  script = tmp_path / 'malloc.sh'
  script.write_text(open(os.path.join(REPO, 'scripts', 'malloc.sh')).read())
  env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
  proc = subprocess.run(
    ['bash', '-c', f'set -euo pipefail; source {script}; echo "done:${{LD_PRELOAD:-}}"'],
    capture_output=True,
    text=True,
    env=env,
  )
  assert proc.returncode == 0 and proc.stdout.strip() == 'done:', (proc.returncode, proc.stderr)
