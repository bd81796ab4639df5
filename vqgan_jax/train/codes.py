"""Moved to `vqgan_jax.encode` (the encode mode; the loaders and sample read its codes);
this keeps the old imports working."""

from vqgan_jax.encode import *  # noqa: F403
