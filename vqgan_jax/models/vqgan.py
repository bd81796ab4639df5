"""Encoder, Decoder and the VQGAN composition (taming `VQModel`)."""

import functools
from typing import Any
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models import layers
from vqgan_jax.models.quantizer import QUANTIZERS

Dtype = Any


class Encoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  dropout: float = 0.0
  double_z: bool = False
  dtype: Dtype = jnp.float32
  remat_policy: str | None = None
  conv_impl: str = 'auto'  # the CPU conv kernels: `kernels.cpu_conv`

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    n = len(self.ch_mult)
    conv = functools.partial(layers.Conv, dtype=self.dtype, conv_impl=self.conv_impl)
    h = conv(self.ch, 3, name='conv_in')(x)
    for i, res in enumerate(layers.level_resolutions(self.resolution, self.ch_mult)):
      h = layers.Level(
        self.ch * self.ch_mult[i],
        self.num_res_blocks,
        use_attn=res in self.attn_resolutions,
        resample='down' if i < n - 1 else 'none',
        dropout=self.dropout,
        dtype=self.dtype,
        remat_policy=self.remat_policy,
        conv_impl=self.conv_impl,
        name=f'down_{i}',
      )(h, deterministic)
    h = layers.MidBlock(
      h.shape[-1], self.dropout, self.dtype, self.remat_policy, self.conv_impl, name='mid'
    )(h, deterministic)
    h = layers.swish(layers.Normalize('norm_out', self.dtype)(h))
    out = 2 * self.z_channels if self.double_z else self.z_channels
    return conv(out, 3, name='conv_out')(h)


class Decoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  out_ch: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str | None = None
  conv_impl: str = 'auto'  # the CPU conv kernels: `kernels.cpu_conv`

  def setup(self):
    n = len(self.ch_mult)
    res = layers.level_resolutions(self.resolution, self.ch_mult)
    conv = functools.partial(layers.Conv, dtype=self.dtype, conv_impl=self.conv_impl)
    self.conv_in = conv(self.ch * self.ch_mult[-1], 3)
    self.mid = layers.MidBlock(
      self.ch * self.ch_mult[-1], self.dropout, self.dtype, self.remat_policy, self.conv_impl
    )
    # Indexed by level like the original's `up.i`; run from the lowest resolution up.
    self.up = [
      layers.Level(
        self.ch * self.ch_mult[i],
        self.num_res_blocks + 1,
        use_attn=res[i] in self.attn_resolutions,
        resample='up' if i > 0 else 'none',
        dropout=self.dropout,
        dtype=self.dtype,
        remat_policy=self.remat_policy,
        conv_impl=self.conv_impl,
      )
      for i in range(n)
    ]
    self.norm_out = layers.Normalize(dtype=self.dtype)
    self.conv_out = conv(self.out_ch, 3)

  def features(self, z, deterministic: bool = True):
    """Activations entering `conv_out` (the adaptive GAN weight differentiates there)."""
    h = self.conv_in(z)
    h = self.mid(h, deterministic)
    for level in reversed(self.up):
      h = level(h, deterministic)
    return layers.swish(self.norm_out(h))

  def __call__(self, z, deterministic: bool = True):
    return self.conv_out(self.features(z, deterministic))


class VQGAN(nn.Module):
  """Taming's VQModel: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder.

  Entry points for `apply(..., method=...)`: `encode`, `decode`, `encode_to_indices`,
  `decode_indices`, `decode_with_features`; `__call__` returns (xrec, qloss, indices).
  Images are NHWC in [-1, 1]; the decoder output is unbounded, as in the original.

  quantizer='vq': VQModel (VectorQuantizer2, beta / legacy_beta; beyond the original:
  codebook_dim, codebook_l2_norm, ema_decay > 0 for an EMA codebook). quantizer='gumbel':
  GumbelVQ (GumbelQuantize: a 1x1 `proj` to n_embed logits and an `embed` table; kl_weight,
  temperature). GumbelVQ has the same quant_conv / post_quant_conv; the original's proj takes
  z_channels inputs from quant_conv's embed_dim outputs, so its checkpoints have embed_dim ==
  z_channels (ours would take any). `train=True` (encode / __call__) is the Gumbel quantizer's
  training forward (noise from the 'gumbel' rng); otherwise its codes are argmax(logits),
  without the noise the original adds even at inference. quantizer='fsq' (fsq_levels,
  embed_dim == len(levels)) and 'lfq' (lfq_bits == embed_dim; beta is its commitment weight)
  have no codebook; n_embed must equal their number of codes. quantizer='kmeans' (f = 1,
  ch_mult=(1,)) reads pixels: no encoder, decoder or 1x1 convs, the params are its
  centres alone (`QuantizerSpec.pixels`). The quantizer is the module
  `quantizer.QUANTIZERS[quantizer]` builds; its fields are read by that entry alone.

  `remat_policy` (a `jax.checkpoint_policies` name, None: off) rematerialises every
  ResnetBlock / AttnBlock of the encoder and decoder; the parameter tree does not change.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 256
  n_embed: int = 1024
  embed_dim: int = 256
  beta: float = 0.25
  legacy_beta: bool = True
  quantizer: str = 'vq'
  kl_weight: float = 1e-8  # gumbel only
  temperature: float = 1.0  # gumbel only (training forward)
  codebook_dim: int = 0  # vq only
  codebook_l2_norm: bool = False  # vq only
  ema_decay: float = 0.0  # vq only
  fsq_levels: Sequence[int] = ()  # fsq only
  lfq_bits: int = 0  # lfq only
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str | None = None
  conv_impl: str = 'auto'  # the CPU conv kernels: `kernels.cpu_conv`

  def setup(self):
    codes = self.spec.num_codes(self)
    if codes != self.n_embed:
      raise ValueError(
        f'n_embed={self.n_embed} but quantizer={self.quantizer!r} gives {codes} codes'
      )
    self.quantize = self.spec.build(self)
    if self.spec.pixels:
      return  # it reads and writes pixels: no encoder, decoder or 1x1 convs
    common = dict(
      ch=self.ch,
      ch_mult=tuple(self.ch_mult),
      num_res_blocks=self.num_res_blocks,
      attn_resolutions=tuple(self.attn_resolutions),
      resolution=self.resolution,
      dropout=self.dropout,
      dtype=self.dtype,
      remat_policy=self.remat_policy,
      conv_impl=self.conv_impl,
    )
    self.encoder = Encoder(z_channels=self.z_channels, **common)
    self.decoder = Decoder(out_ch=self.out_ch, **common)
    one = ((0, 0), (0, 0))
    conv = functools.partial(layers.Conv, padding=one, dtype=self.dtype, conv_impl=self.conv_impl)
    self.quant_conv = conv(self.embed_dim, 1)
    self.post_quant_conv = conv(self.z_channels, 1)

  @property
  def spec(self):
    """This model's quantizer entry of `quantizer.QUANTIZERS`."""
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f'quantizer={self.quantizer!r}: use one of {tuple(QUANTIZERS)}')
    return QUANTIZERS[self.quantizer]

  @property
  def downsample_factor(self):
    return 2 ** (len(self.ch_mult) - 1)

  def encode(
    self,
    x,
    deterministic: bool = True,
    train: bool = False,
    *,
    with_latents: bool = False,
    **terms,
  ):
    """Returns (z_q (B,h,w,embed_dim) float32, qloss, indices (B,h,w)).

    `deterministic`: dropout off. `train`: the quantizer's training forward where it has one
    (`QuantizerSpec.train_forward`: Gumbel's). `terms`: the train step's extra quantizer
    keywords (`QuantizerSpec.train_terms`: LFQ's entropy term). `with_latents`: also return
    the quantizer's latents (B,h,w,D) (z where codes are picked, without gradient), for the
    codebook updates of the train step.
    """
    h = x if self.spec.pixels else self.quant_conv(self.encoder(x, deterministic))
    if self.spec.train_forward:
      terms = dict(terms, train=train)
    out = self.quantize(h, **terms)
    if with_latents:
      return (*out, jax.lax.stop_gradient(self.quantize.latents(h)))
    return out

  def encode_to_indices(self, x):
    return self.encode(x)[2]

  def decode(self, z_q, deterministic: bool = True):
    if self.spec.pixels:
      return z_q
    return self.decoder(self.post_quant_conv(z_q), deterministic)

  def decode_indices(self, indices):
    return self.decode(self.quantize.lookup(indices))

  def decode_with_features(self, z_q, deterministic: bool = True):
    """(features entering decoder.conv_out, reconstruction)."""
    if self.spec.pixels:
      return z_q, z_q
    h = self.decoder.features(self.post_quant_conv(z_q), deterministic)
    return h, self.decoder.conv_out(h)

  def __call__(self, x, deterministic: bool = True, train: bool = False):
    z_q, qloss, indices = self.encode(x, deterministic, train)
    return self.decode(z_q, deterministic), qloss, indices


def from_config(
  fields, *, dtype=jnp.float32, remat_policy=None, frozen=False, conv_impl='auto'
) -> VQGAN:
  """The VQGAN described by stage-1 `model` fields (a ConfigDict or a dict, as saved in a
  checkpoint's config): the one place a config becomes a module. Every field is read as it
  is: a saved config gets the fields added after it was written when it is read
  (`run_config.upgrade_config`). `frozen`: no dropout (encode, decode, stage 2). `dtype`,
  `remat_policy` and `conv_impl` say how it runs, not what it computes (`config.train`'s).
  """
  return VQGAN(
    ch=fields['ch'],
    ch_mult=tuple(fields['ch_mult']),
    num_res_blocks=fields['num_res_blocks'],
    attn_resolutions=tuple(fields['attn_resolutions']),
    resolution=fields['resolution'],
    in_channels=fields['in_channels'],
    out_ch=fields['out_ch'],
    z_channels=fields['z_channels'],
    n_embed=fields['n_embed'],
    embed_dim=fields['embed_dim'],
    beta=fields['beta'],
    legacy_beta=fields['legacy_beta'],
    quantizer=fields['quantizer'],
    kl_weight=fields['kl_weight'],
    temperature=fields['temperature'],
    codebook_dim=fields['codebook_dim'],
    codebook_l2_norm=fields['codebook_l2_norm'],
    ema_decay=fields['ema_decay'],
    fsq_levels=tuple(fields['fsq_levels'] or ()),
    lfq_bits=fields['lfq_bits'],
    dropout=0.0 if frozen else fields['dropout'],
    dtype=dtype,
    remat_policy=remat_policy,
    conv_impl=conv_impl,
  )
