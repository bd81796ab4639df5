"""MaskGIT's bidirectional transformer (Chang et al. 2022) over the GPT's blocks, and its
masking schedules.

The input is `[condition tokens | image codes]` where unknown codes are the `[MASK]` id
(`mask_id`, the last id of the vocabulary); every position attends to every other (no causal
mask). The output is, at each position, logits over the `n_image` image codes only: condition
ids and the mask id are never predicted.

Parameters reuse the GPT's names, blocks and logical axes (`transformer.Block` with
`causal=False`, `TokenEmbed`, the same Dense and LayerNorm helpers), so the GPT's sharding
rules, remat policies, bf16 `mixed_einsum` dots and the scan/per-layer converters
(`stack_layers` / `unstack_layers`) serve it unchanged. Two differences from the GPT: the
position embedding starts at N(0, 0.02) instead of 0 (at init every masked position would
otherwise see the same input, and BERT-style models start there), and the head has a bias
over the image codes (MaskGIT's output bias).
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vqgan_jax.models import transformer as tf

Dtype = Any

SCHEDULES = ('cosine', 'linear', 'square')


def mask_ratio(r, schedule='cosine', xp=jnp):
  """gamma(r): the fraction of codes still masked after a fraction r in [0, 1] of decoding
  (1 at r = 0, 0 at r = 1). Training masks ceil(gamma(r) N) codes with r ~ U(0, 1) and the
  cosine schedule. `xp`: jnp (traced) or numpy (float64 on the host)."""
  if schedule == 'cosine':
    return xp.cos(0.5 * math.pi * r)
  if schedule == 'linear':
    return 1.0 - r
  if schedule == 'square':
    return 1.0 - r * r
  raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')


class MaskGIT(nn.Module):
  """`__call__(tokens) -> logits (B, T, n_image)` in float32; tokens (B, T <= block_size).

  Attributes are the GPT's (see `transformer.GPT`), plus:
    n_image: the image codebook size (ids [0, n_image) are codes; the head predicts them).
    mask_id: the [MASK] id (< vocab_size).
  """

  vocab_size: int
  block_size: int
  n_image: int
  mask_id: int
  n_layer: int = 12
  n_head: int = 8
  n_embd: int = 256
  embd_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  attn_pdrop: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool | str = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, tokens, deterministic: bool = True):
    t = tokens.shape[1]
    if t > self.block_size:
      raise ValueError(f'sequence length {t} > block_size {self.block_size}')
    x = tf.embed(self, tokens, 0, deterministic, nn.initializers.normal(tf.INIT_STD))
    x, _ = tf.run_blocks(self, x, deterministic, causal=False)
    x = tf._layer_norm(x, 'ln_f')
    logits = tf._dense(self.n_image, ('embed', 'vocab'), self.dtype, name='head')(x)
    return logits.astype(jnp.float32)
