"""Shared pytest setup: every test sees 8 fake CPU devices (for sharding tests).

The device count must be fixed before JAX initialises its backends, hence here,
before any test module imports jax.
"""

import collections
import os

# Tests compile far more than they compute (most of a test's time is XLA:CPU compiling, most
# of that in LLVM): LLVM at -O1 compiles about a quarter faster from the same HLO. Appended
# to the caller's flags, and inherited by the subprocesses the end-to-end tests start.
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --xla_backend_optimization_level=1'

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

if os.environ.get('VQGAN_JAX_BOUNDS_LOG'):  # experiments/test_bounds.py: record every bound
  import bounds  # noqa: E402

  bounds.record_allclose()


# Seconds each slow file takes on a 2-core VM in the parallel suite (`pytest --durations=0`,
# summed per file). xdist's default hands files out by test count, so the files with few but
# long end-to-end tests started last and ran alone for minutes; scripts/test.sh turns that off
# (--no-loadscope-reorder) and the files are collected longest first instead.
FILE_SECONDS = {  # 2026-12-07, 2-core AMD EPYC (Zen 4) VM, the whole suite in 12.8 min
  'test_multihost.py': 260,
  'test_stage2.py': 190,
  'test_main.py': 180,
  'test_train.py': 110,
  'test_maskgit.py': 80,
  'test_sampling.py': 60,
  'test_models.py': 55,
  'test_bf16.py': 50,
  'test_experiments.py': 45,
  'test_quantizers.py': 45,
  'test_parity_stage1.py': 40,
  'test_eval.py': 35,
  'test_pixels.py': 35,
  'test_parity_stage2.py': 35,
  'test_completion.py': 35,
  'test_convert.py': 30,
  'test_transformer.py': 30,
}


def pytest_collection_modifyitems(config, items):
  del config
  path = lambda item: item.nodeid.split('::')[0]
  counts = collections.Counter(map(path, items))
  rank = lambda p: (-FILE_SECONDS.get(os.path.basename(p), 0), -counts[p])
  order = {p: i for i, p in enumerate(sorted(counts, key=rank))}
  items.sort(key=lambda item: order[path(item)])  # stable: a file's own order is kept
