"""Kept for config files written against it: the stage-1 schema now lives in the package,
`vqgan_jax/config_base.py` (the installed package never imports this folder)."""

from vqgan_jax.config_base import logical_axis_rules  # noqa: F401
from vqgan_jax.config_base import parse_arg  # noqa: F401
from vqgan_jax.config_base import stage1_base  # noqa: F401
from vqgan_jax.config_base import stage1_smoke as apply_smoke  # noqa: F401
