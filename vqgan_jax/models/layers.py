"""Building blocks of the taming VQGAN (`taming/modules/diffusionmodules/model.py`).

Submodule names follow the original state-dict keys: torch `down.0.block.1.conv1.weight` is
flax `down_0/block_1/conv1/kernel`, so weight conversion is a table, not a search.

Rematerialisation: `remat_policy` (a `jax.checkpoint_policies` name, None: off) wraps every
ResnetBlock and AttnBlock of a Level / MidBlock in `nn.remat`. The wrapped module keeps its
name, so the parameter tree is the same with remat on or off.

Lower-precision `dtype` (bf16): convs and attention dots take bf16 operands, accumulate and
return float32 (`mixed_conv`, `mixed_einsum`, both with bf16 backward passes); GroupNorm
statistics, biases and the residual stream stay float32. float32 runs the exact float32 ops.
"""

import functools
from typing import Any
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.kernels.conv import conv2d
from vqgan_jax.kernels.conv import upsample_conv2d
from vqgan_jax.kernels.mixed import mixed_einsum

Dtype = Any

# `jax.checkpoint_policies` usable by name (the others are factories that need arguments).
REMAT_POLICIES = (
  'nothing_saveable',
  'everything_saveable',
  'dots_saveable',
  'checkpoint_dots',
  'dots_with_no_batch_dims_saveable',
  'checkpoint_dots_with_no_batch_dims',
)


def remat_module(cls, policy: str | None, static_argnums=()):
  """`cls` under `nn.remat` with the named checkpoint policy; `cls` itself for None."""
  if not policy:
    return cls
  if policy not in REMAT_POLICIES:
    raise ValueError(f'remat policy {policy!r}: use one of {REMAT_POLICIES}')
  return nn.remat(
    cls, policy=getattr(jax.checkpoint_policies, policy), static_argnums=static_argnums
  )


def torch_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's default conv/linear init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
  fan_in = 1
  for d in shape[:-1]:
    fan_in *= d
  bound = 1.0 / jnp.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv(nn.Module):
  """A 2-D NHWC convolution with torch-default init (bias ~ U(+-1/sqrt(fan_in)) too).

  `padding` is explicit ((top, bottom), (left, right)) so torch's layouts are reproduced.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Any = 'torch'  # 'torch': symmetric kernel_size // 2, like nn.Conv2d(padding=k//2)
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = torch_kernel_init
  # True: the conv of x upsampled x2 (nearest), as `upsample_conv2d` (3x3, stride 1, 'torch').
  upsample: bool = False
  conv_impl: str = 'auto'  # which kernels compute it on CPU: `kernels.cpu_conv`

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    in_features = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (k, k, in_features, self.features))
    pad = self.padding
    if pad == 'torch':
      pad = ((k // 2, k // 2), (k // 2, k // 2))
    # bf16: float32 out (accumulated), so biases, norms and the residual stream stay float32.
    if self.upsample:
      if (k, self.strides, self.padding) != (3, 1, 'torch'):
        raise ValueError('upsample: only the 3x3, stride-1, torch-padded conv')
      y = upsample_conv2d(x.astype(self.dtype), kernel, self.conv_impl)
    else:
      y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, pad, self.conv_impl)
    if self.use_bias:
      fan_in = k * k * in_features
      bound = 1.0 / jnp.sqrt(fan_in)
      bias = self.param(
        'bias',
        lambda key, s: jax.random.uniform(key, s, jnp.float32, -bound, bound),
        (self.features,),
      )
      y = y + bias.astype(y.dtype)
    return y


class GroupNorm(nn.Module):
  """GroupNorm(32 groups, eps 1e-6, affine) with statistics in float32.

  Same parameters as flax's GroupNorm (`scale`, `bias`), computed as per-channel moments
  reduced to groups, then one fused multiply-add: XLA:CPU runs flax's grouped-reshape
  reduction 3-4x slower at 64+ channels, and the norm sits before every conv here.
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, c = x.shape[0], x.shape[-1]
    g = self.num_groups
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    xf = x.astype(jnp.float32).reshape(b, -1, c)
    mean = jnp.mean(xf, axis=1).reshape(b, g, c // g).mean(-1)
    meansq = jnp.mean(jnp.square(xf), axis=1).reshape(b, g, c // g).mean(-1)
    # E[x^2] - E[x]^2 in float32, floored at 0 against cancellation.
    inv = jax.lax.rsqrt(jnp.maximum(meansq - jnp.square(mean), 0.0) + self.epsilon)
    a = jnp.repeat(inv, c // g, axis=1) * scale
    shift = bias - jnp.repeat(mean, c // g, axis=1) * a
    y = x.astype(jnp.float32) * a[:, None, None, :] + shift[:, None, None, :]
    return y.astype(self.dtype)


def Normalize(name=None, dtype: Dtype = jnp.float32):  # pylint: disable=invalid-name
  """GroupNorm(32, eps=1e-6, affine) as the original."""
  return GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)


def swish(x):
  return x * jax.nn.sigmoid(x)


class ResnetBlock(nn.Module):
  out_channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    in_channels = x.shape[-1]
    h = swish(Normalize('norm1', self.dtype)(x))
    conv = functools.partial(Conv, dtype=self.dtype, conv_impl=self.conv_impl)
    h = conv(self.out_channels, 3, name='conv1')(h)
    h = swish(Normalize('norm2', self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)
    h = conv(self.out_channels, 3, name='conv2')(h)
    if in_channels != self.out_channels:
      x = conv(self.out_channels, 1, padding=((0, 0), (0, 0)), name='nin_shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head global self-attention over H*W positions, scaled by C**-0.5.

  The original's q/k/v/proj_out are 1x1 convs; here they are Dense layers on NHWC
  (torch weight[:, :, 0, 0].T is the Dense kernel).
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    mixed = jnp.dtype(self.dtype) != jnp.float32
    # Lower precision: every dot through `mixed_einsum` (bf16 backward, float32 accumulation).
    einsum = (
      (lambda spec, a, b: mixed_einsum(spec, a.astype(self.dtype), b.astype(self.dtype)))
      if mixed
      else jnp.einsum
    )
    h = Normalize('norm', self.dtype)(x)
    dense = lambda name: nn.Dense(
      c,
      dtype=self.dtype,
      kernel_init=torch_kernel_init,
      bias_init=_torch_bias_init(c),
      dot_general=_mixed_dense_dot if mixed else jax.lax.dot_general,
      name=name,
    )
    q = dense('q')(h).reshape(b, hh * ww, c)
    k = dense('k')(h).reshape(b, hh * ww, c)
    v = dense('v')(h).reshape(b, hh * ww, c)
    w = einsum('bqc,bkc->bqk', q, k) * (c**-0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = einsum('bqk,bkc->bqc', w, v).reshape(b, hh, ww, c)
    return x + dense('proj_out')(out)


def _mixed_dense_dot(x, kernel, dimension_numbers, precision=None, **unused):
  """nn.Dense's dot (x (..., in) . kernel (in, out)) through `mixed_einsum`."""
  del precision
  if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or kernel.ndim != 2:
    raise ValueError(f'unexpected Dense dot {dimension_numbers}')
  return mixed_einsum('...i,io->...o', x, kernel)


def _torch_bias_init(fan_in):
  bound = 1.0 / (fan_in**0.5)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after zero-padding only right and bottom by one (the original's quirk)."""

  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    pad = ((0, 1), (0, 1))
    conv = Conv(x.shape[-1], 3, 2, pad, dtype=self.dtype, conv_impl=self.conv_impl, name='conv')
    return conv(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv (computed as one sub-pixel conv)."""

  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    conv = Conv(
      x.shape[-1], 3, dtype=self.dtype, upsample=True, conv_impl=self.conv_impl, name='conv'
    )
    return conv(x)


def _remat_blocks(m, channels):
  """(block(name), attn(name)): constructors of `m`'s ResnetBlocks of `channels` and its
  AttnBlocks, rematerialised as `m.remat_policy` says (`m`: a Level or the MidBlock)."""
  # static_argnums counts `self`: `deterministic` (a Python bool) is argument 2.
  resnet = remat_module(ResnetBlock, m.remat_policy, static_argnums=(2,))
  attn = remat_module(AttnBlock, m.remat_policy)
  return (
    lambda name: resnet(channels, m.dropout, m.dtype, m.conv_impl, name=name),
    lambda name: attn(m.dtype, name=name),
  )


class Level(nn.Module):
  """One resolution level: `num_blocks` ResnetBlocks (each followed by attention when
  `use_attn`), then an optional resampler. Named `down_i` / `up_i` by its parent."""

  out_channels: int
  num_blocks: int
  use_attn: bool
  resample: str  # 'down', 'up' or 'none'
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str | None = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    block, attn = _remat_blocks(self, self.out_channels)
    for j in range(self.num_blocks):
      x = block(f'block_{j}')(x, deterministic)
      if self.use_attn:
        x = attn(f'attn_{j}')(x)
    if self.resample == 'down':
      x = Downsample(self.dtype, self.conv_impl, name='downsample')(x)
    elif self.resample == 'up':
      x = Upsample(self.dtype, self.conv_impl, name='upsample')(x)
    return x


class MidBlock(nn.Module):
  channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str | None = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    block, attn = _remat_blocks(self, self.channels)
    x = block('block_1')(x, deterministic)
    x = attn('attn_1')(x)
    return block('block_2')(x, deterministic)


def level_resolutions(resolution: int, ch_mult: Sequence[int]):
  """Configured resolution at each level (attention placement follows it, not the input)."""
  return [resolution // 2**i for i in range(len(ch_mult))]
