"""Shared pytest setup: every test sees 8 fake CPU devices (for sharding tests).

The device count must be fixed before JAX initialises its backends, hence here,
before any test module imports jax.
"""

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
