"""Shared pytest setup: every test sees 8 fake CPU devices (for sharding tests).

The device count must be fixed before JAX initialises its backends, hence here,
before any test module imports jax.
"""

import jax

jax.config.update('jax_num_cpu_devices', 8)
