"""Where a result row was measured: CPU model and the flags that change XLA's and oneDNN's
code paths, core count, library versions, the malloc, commit and time. Every script that writes rows
under experiments/results/ writes them with `write_row`, which adds these fields
(tests/test_experiments.py checks both)."""

import datetime
import importlib.metadata
import json
import os
import subprocess

from vqgan_jax import malloc

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')

# The flags that decide which kernels XLA:CPU and oneDNN pick.
CPU_FLAGS = ('avx', 'avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_fp16', 'amx_bf16', 'amx_tile')


def _cpuinfo() -> tuple[str, list[str]]:
  model, flags = 'unknown', []
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name' and model == 'unknown':
          model = value.strip()
        elif key.strip() == 'flags' and not flags:
          have = set(value.split())
          flags = [flag for flag in CPU_FLAGS if flag in have]
  except OSError:
    pass
  return model, flags


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _commit() -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    out = subprocess.run(
      ['git', '-C', root, 'describe', '--always', '--dirty'], capture_output=True, text=True
    )
  except OSError:
    return None
  return out.stdout.strip() or None


def info() -> dict:
  model, flags = _cpuinfo()
  return {
    'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
    'commit': _commit(),
    'cpu_model': model,
    'cpu_flags': flags,
    'cores': os.cpu_count(),
    'jax': _version('jax'),
    'jaxlib': _version('jaxlib'),
    'torch': _version('torch'),
    # XLA:CPU's step times depend on it (vqgan_jax/malloc.py).
    'malloc': malloc.name(),
  }


def write_row(out: str, row: dict, echo: bool = True) -> dict:
  """Prints `row` with where it was measured (`info()`) as one JSON line (unless `echo` is
  False) and appends it to `out` (a file name under experiments/results/, or a path);
  `out=''` or '-' only prints (a trial run). Returns the row as written. Notes about a run belong
  in experiments/README.md, not in its rows."""
  full = {**info(), **row}  # a row's own field wins (e.g. the commit a long run started at)
  line = json.dumps(full)
  if echo:
    print(line, flush=True)
  if out and out != '-':
    path = out if os.path.dirname(out) else os.path.join(RESULTS, out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a') as f:
      f.write(line + '\n')
  return full
