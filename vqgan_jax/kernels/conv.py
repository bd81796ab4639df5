"""The convolutions every model here runs: NHWC x HWIO with explicit torch-style padding,
float32 or mixed precision (bf16 operands, float32 accumulation), and the sub-pixel form of
the decoder's upsample conv. Which kernel computes them on CPU is `impl` (see `cpu_conv`).
"""

import functools

import jax
import jax.numpy as jnp

from vqgan_jax.kernels import cpu_conv as cpu
from vqgan_jax.kernels.mixed import mixed_einsum

IMPLS = cpu.IMPLS


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _float32_conv(x, kernel, strides, padding, impl):
  return cpu.conv_fast(x, kernel, strides, padding, impl)


def _float32_conv_fwd(x, kernel, strides, padding, impl):
  return cpu.conv_fast(x, kernel, strides, padding, impl), (x, kernel)


def _float32_conv_bwd(strides, padding, impl, res, g):
  x, kernel = res
  if cpu.wino_applies(x, kernel, strides, padding, impl):

    def native(x, kernel, g):
      return jax.vjp(lambda a, k: cpu.lax_conv(a, k, strides, padding), x, kernel)[1](g)

    return jax.lax.platform_dependent(x, kernel, g, cpu=cpu.wino_conv_bwd, default=native)
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  if strides == 1 and max(pt, pb) < kh and max(pl, pr) < kw:
    # A stride-1 conv's input gradient is the conv of g with the flipped, transposed kernel.
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = cpu.conv_fast(
      g, flipped, 1, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)), impl
    )
  else:
    (dx,) = jax.vjp(lambda a: cpu.lax_conv(a, kernel, strides, padding), x)[1](g)
  return dx, cpu.kernel_grad(x, g, kernel, strides, padding, impl)


_float32_conv.defvjp(_float32_conv_fwd, _float32_conv_bwd)


# Plain autodiff through a bf16 conv that accumulates into float32 runs its backward in
# float32: the float32 cotangent promotes the bf16 operand, and both backward convs run on
# float32 operands. `mixed_conv` keeps them in the operands' dtype, as `mixed_einsum` does
# for the GPT's dots. The backward returns bf16 (the operands' cotangents); on XLA:CPU
# bf16 convs time exactly like float32 ones at every shape measured (widened inside), so they
# accumulate in float32 there; accelerators accumulate bf16 convs in float32 anyway.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def mixed_conv(x, kernel, strides, padding, impl='auto'):
  """NHWC x HWIO conv of same-dtype operands, accumulated and returned in float32."""
  return cpu.lax_conv(x, kernel, strides, padding, jnp.float32)


def _mixed_conv_fwd(x, kernel, strides, padding, impl):
  return mixed_conv(x, kernel, strides, padding, impl), (x, kernel)


def _mixed_conv_bwd(strides, padding, impl, res, g):
  x, kernel = res
  g = g.astype(x.dtype)
  (dx,) = jax.vjp(lambda a: cpu.lax_conv(a, kernel, strides, padding), x)[1](g)
  return dx, cpu.kernel_grad(x, g, kernel, strides, padding, impl)


mixed_conv.defvjp(_mixed_conv_fwd, _mixed_conv_bwd)


def conv2d(x, kernel, strides=1, padding=((0, 0), (0, 0)), impl='auto'):
  """NHWC x HWIO convolution with explicit ((top, bottom), (left, right)) padding.

  float32 operands: the exact float32 conv. Lower precision: `mixed_conv` (float32 result).
  Either way, on CPU the kernel gradient of 16+ output channels is `cpu_conv`'s (`impl`: see
  `cpu_conv`; 'xla' keeps XLA's).

  XLA:CPU's convolution is pathologically slow when the output is 1-2 pixels wide (64x2x2x512
  3x3 conv: 800 ms instead of 8 ms; LPIPS's relu5 stage at 32x32 inputs hits it), so tiny
  spatial outputs use an explicit patch matrix and one matmul instead.
  """
  kh, kw, cin, cout = kernel.shape
  mixed = jnp.dtype(x.dtype) != jnp.float32
  if (kh, kw, strides) == (1, 1, 1) and not any(map(any, padding)):
    # A 1x1 conv is a matmul over channels. XLA:CPU's conv ran 2.7-4.3x slower than the dot
    # (64 -> 32 channels at 32x32: 80.9 vs 18.7 ms at batch 250, 2.5 vs 0.95 ms at 32), and
    # its autodiff 2.8-7x slower than the dot's.
    if mixed:
      return mixed_einsum('bhwi,io->bhwo', x, kernel[0, 0])
    return jnp.einsum('bhwi,io->bhwo', x, kernel[0, 0], preferred_element_type=jnp.float32)
  if min(x.shape[1] + sum(padding[0]) - kh, x.shape[2] + sum(padding[1]) - kw) // strides >= 2 or (
    kh == 1 and kw == 1
  ):
    padding = tuple(map(tuple, padding))
    if mixed:
      return mixed_conv(x, kernel, strides, padding, impl)
    if impl == 'xla':
      return cpu.lax_conv(x, kernel, strides, padding)
    return _float32_conv(x, kernel, strides, padding, impl)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  ho = (xp.shape[1] - kh) // strides + 1
  wo = (xp.shape[2] - kw) // strides + 1
  cols = jnp.concatenate(cpu.taps(xp, kh, kw, strides, ho, wo), axis=-1)
  cols, kernel = cols.reshape(-1, kh * kw * cin), kernel.reshape(kh * kw * cin, cout)
  y = mixed_einsum('nk,ko->no', cols, kernel) if mixed else cols @ kernel
  return y.reshape(x.shape[0], ho, wo, cout)


# For each output phase (0: even rows, 1: odd), which of a 3x3 kernel's rows land on each row
# of a 2x2 window over the low-resolution input: even output rows 2i see x[i-1] (kernel row 0)
# and x[i] (rows 1, 2); odd rows 2i+1 see x[i] (rows 0, 1) and x[i+1] (row 2). Same for columns.
_SUBPIXEL_ROWS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def upsample_conv2d(x, kernel, impl='auto'):
  """The 3x3 'same' conv (HWIO `kernel`) of `x` upsampled x2 by nearest neighbour, without
  building the upsampled tensor: each output phase (row and column parity) is a 2x2 conv of
  `x` with summed taps, and one 2x2 conv with four times the output channels computes all
  four phases. 16 multiply-adds per output pixel pair instead of 36 (rounding differs only in
  the order of the sums). `kernel` is float32; it is combined, then cast to `x`'s dtype."""
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  m = jnp.asarray(_SUBPIXEL_ROWS, jnp.float32)
  # Phase-major output channels (4, cout): phase-minor ones would keep a tensor-parallel split
  # of cout in blocks, but their interleave ran 15-35% slower here (XLA:CPU, 16x16x64).
  k2 = jnp.einsum('arp,csq,pqio->rsiaco', m, m, kernel.astype(jnp.float32))
  k2 = k2.reshape(2, 2, cin, 4 * cout).astype(x.dtype)
  y = conv2d(x, k2, 1, ((1, 1), (1, 1)), impl).reshape(b, h + 1, w + 1, 2, 2, cout)
  # Phase (a, c) at (i, j) is window (i + a, j + c); out[2i + a, 2j + c] interleaves them.
  rows = [jnp.stack([y[:, a : a + h, c : c + w, a, c] for c in range(2)], 3) for a in range(2)]
  return jnp.stack(rows, 2).reshape(b, 2 * h, 2 * w, cout)
