"""Moved to `models.gpt_load` (the loaders and the modes use it); this keeps the old imports
working."""

from vqgan_jax.models.gpt_load import *  # noqa: F403
from vqgan_jax.models.gpt_load import _layout_from  # noqa: F401
from vqgan_jax.models.gpt_load import _merge_model_fields  # noqa: F401
