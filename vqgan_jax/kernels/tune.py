"""conv_impl='tuned': each CPU conv's kernel chosen by timing the candidates once, at the first
trace of that conv shape, and remembered on disk (as cuDNN's benchmark mode does).

The shape windows of 'auto' were measured on one AVX2 machine; on AVX-512 (wider vectors for
XLA's and oneDNN's own kernels) part of their lead is lost. Here the winner is measured on
the machine that runs, per (direction, dtype, input shape, kernel shape, stride, padding),
and cached under `cache_path()` in a JSON file keyed also by what changes the winner: the
CPU's vector flags, the core count and the jax version. A missing entry costs one timing
(compile and best of `ROUNDS` runs of each candidate, at trace time); later traces and
processes read the file. The timer is `measure` (tests replace it: they never time).
"""

import json
import os
import tempfile
import time

import jax
import numpy as np

ROUNDS = 3
# The CPU flags that change which conv kernel wins (XLA's and oneDNN's code paths).
CPU_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')
_CACHE = {'path': None, 'entries': None}


def cache_path() -> str:
  """$VQGAN_JAX_CACHE/conv_choice.json, else ~/.cache/vqgan_jax/conv_choice.json."""
  root = os.environ.get('VQGAN_JAX_CACHE') or os.path.join(
    os.path.expanduser('~'), '.cache', 'vqgan_jax'
  )
  return os.path.join(root, 'conv_choice.json')


def cpu_flags() -> tuple:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'flags':
          have = set(value.split())
          return tuple(flag for flag in CPU_FLAGS if flag in have)
  except OSError:
    pass
  return ()


def machine_key() -> str:
  return f'{"+".join(cpu_flags()) or "noflags"}|cores={os.cpu_count()}|jax={jax.__version__}'


def conv_key(direction, dtype, x_shape, k_shape, strides, padding) -> str:
  pad = ','.join(f'{a}:{b}' for a, b in padding)
  shape = lambda s: 'x'.join(map(str, s))
  return f'{direction}|{np.dtype(dtype).name}|{shape(x_shape)}|{shape(k_shape)}|s{strides}|p{pad}'


def _entries() -> dict:
  """The cache file's entries ({machine key: {conv key: record}}), read once per path."""
  path = cache_path()
  if _CACHE['path'] != path:
    _CACHE.update(path=path, entries=_read(path))
  return _CACHE['entries']


def _read(path) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):  # absent, or unreadable / corrupt: measured again
    return {}
  return data if isinstance(data, dict) else {}


def _write(machine, key, record) -> None:
  """Adds one record to the file: re-read (another process may have added some), then
  replaced atomically, so a reader never sees half a file."""
  path = cache_path()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = _read(path)
  data.setdefault(machine, {})[key] = record
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.conv_choice.')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(data, f, indent=0, sort_keys=True)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users' runs
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  _CACHE.update(path=path, entries=data)


def measure(candidates: dict, args: tuple) -> dict:
  """{name: best seconds of `ROUNDS` runs} of each candidate `fn(*args)`, compiled first and
  timed in turn (A, B, A, B, ...) so that all see the same machine load."""
  compiled = {name: jax.jit(fn) for name, fn in candidates.items()}
  for fn in compiled.values():
    jax.block_until_ready(fn(*args))
  best = dict.fromkeys(compiled, float('inf'))
  for _ in range(ROUNDS):
    for name, fn in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[name] = min(best[name], time.perf_counter() - t0)
  return best


def choose(direction, dtype, x_shape, k_shape, strides, padding, candidates: dict) -> str:
  """The fastest of `candidates` ({name: fn(a, b)} on (x_shape, k_shape-derived) operands,
  see `operands`) for this conv on this machine: from the cache, else measured now (eagerly,
  also when called while tracing) and cached. One candidate: no timing."""
  if len(candidates) == 1:
    return next(iter(candidates))
  machine = machine_key()
  key = conv_key(direction, dtype, x_shape, k_shape, strides, padding)
  record = _entries().get(machine, {}).get(key)
  if record and record.get('choice') in candidates:
    return record['choice']
  with jax.ensure_compile_time_eval():
    seconds = measure(candidates, operands(direction, dtype, x_shape, k_shape, strides, padding))
  choice = min(seconds, key=seconds.get)
  _write(machine, key, {'choice': choice, 'ms': {n: round(1e3 * s, 3) for n, s in seconds.items()}})
  return choice


def operands(direction, dtype, x_shape, k_shape, strides, padding):
  """Random operands of a conv's forward ((x, kernel)) or kernel gradient ((x, g))."""
  rng = np.random.RandomState(0)
  x = rng.randn(*x_shape).astype(dtype)
  if direction == 'fwd':
    return x, (0.05 * rng.randn(*k_shape)).astype(dtype)
  kh, kw, _, cout = k_shape
  ho = (x_shape[1] + sum(padding[0]) - kh) // strides + 1
  wo = (x_shape[2] + sum(padding[1]) - kw) // strides + 1
  return x, rng.randn(x_shape[0], ho, wo, cout).astype(dtype)
