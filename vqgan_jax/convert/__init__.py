"""Converters from the original PyTorch checkpoints to this project's params and checkpoints.

  python -m vqgan_jax.convert taming --ckpt last.ckpt --config model.yaml --out DIR
"""

from vqgan_jax.convert.taming import ConversionError
from vqgan_jax.convert.taming import convert_taming_checkpoint
from vqgan_jax.convert.taming import convert_vqmodel_state_dict
from vqgan_jax.convert.taming import stage1_config

__all__ = ['ConversionError', 'convert_taming_checkpoint', 'convert_vqmodel_state_dict',
           'stage1_config']
