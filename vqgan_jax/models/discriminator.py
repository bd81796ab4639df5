"""PatchGAN discriminator (taming `NLayerDiscriminator`, BatchNorm variant).

Layers are named after the original `nn.Sequential` indices (`main.0`, `main.2`, `main.3`,
...) as `main_0`, `main_2`, ... Batch statistics live in the `batch_stats` collection; under a
sharded `jax.jit` the batch mean/variance are computed over the *global* batch, so the
result does not depend on how the batch is split over devices.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models.layers import Conv

Dtype = Any


class TorchBatchNorm(nn.Module):
  """BatchNorm2d with torch semantics: eps 1e-5, momentum 0.1, running variance updated
  with the *unbiased* batch variance (flax's BatchNorm uses the biased one)."""

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param('scale', lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s), (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if not self.is_initializing():
        n = xf.size // c
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * var * (
          n / max(n - 1, 1)
        )
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


def _normal_002(key, shape, dtype=jnp.float32):
  return 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
  """Returns a patch map of raw logits (B, h, w, 1)."""

  ndf: int = 64
  n_layers: int = 3
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'  # the CPU conv kernels: `kernels.cpu_conv`

  @nn.compact
  def __call__(self, x, train: bool = True):
    pad1 = ((1, 1), (1, 1))
    conv = lambda f, s, bias, name: Conv(
      f,
      4,
      strides=s,
      padding=pad1,
      use_bias=bias,
      dtype=self.dtype,
      conv_impl=self.conv_impl,
      kernel_init=_normal_002,
      name=name,
    )
    lrelu = lambda h: jax.nn.leaky_relu(h, 0.2)
    h = lrelu(conv(self.ndf, 2, True, 'main_0')(x))
    idx = 2
    mult = 1
    for n in range(1, self.n_layers + 1):
      mult = min(2**n, 8)
      stride = 2 if n < self.n_layers else 1
      h = conv(self.ndf * mult, stride, False, f'main_{idx}')(h)
      h = lrelu(TorchBatchNorm(dtype=self.dtype, name=f'main_{idx + 1}')(h, train))
      idx += 3
    return conv(1, 1, True, f'main_{idx}')(h).astype(jnp.float32)
