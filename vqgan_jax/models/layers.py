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

from vqgan_jax.models.transformer import mixed_einsum

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


def _conv(x, kernel, strides, padding, preferred_element_type=None):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (strides, strides),
    padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    preferred_element_type=preferred_element_type,
  )


_PATCH_CHUNK_BYTES = 4 << 20
# False: XLA's own convs and conv gradients on every platform. Benchmarks count a step's FLOPs
# with it (XLA's cost analysis counts a loop's body once, not once per iteration).
CPU_PATCH_MATMULS = True


def _taps(xp, kh, kw, strides, ho, wo):
  """The kh*kw strided (B, ho, wo, C) views of padded `xp` that a conv's taps multiply."""
  return [
    xp[:, i : i + strides * (ho - 1) + 1 : strides, j : j + strides * (wo - 1) + 1 : strides]
    for i in range(kh)
    for j in range(kw)
  ]


def _loops_allowed():
  """Whether the CPU conv paths may loop over batch chunks: on one device only. With a sharded
  batch the loop would hold collectives, and XLA:CPU's in-process collectives deadlocked in one
  on the two-process tests' 2x2 mesh. (The tests set it to cover both branches.)"""
  return jax.device_count() == 1


def _batch_chunk(b, per_image, budget=None):
  """The largest divisor of the batch `b` whose patch matrices fit `budget` bytes
  (`_PATCH_CHUNK_BYTES`)."""
  budget = _PATCH_CHUNK_BYTES if budget is None else budget
  fits = [c for c in range(1, b + 1) if b % c == 0 and c * per_image <= budget]
  return max(fits or [1])


def _split(a, chunk):
  """(B, ...) -> (B // chunk, chunk, ...): the batch chunks a loop scans over."""
  return a.reshape(a.shape[0] // chunk, chunk, *a.shape[1:])


def _conv_patches(x, kernel, padding):
  """Stride-1 `_conv` as a loop over batch chunks, each a patch-matrix matmul
  (B_c*Ho*Wo, kh*kw*Cin) @ (kh*kw*Cin, Cout) sized to stay in cache; where one image's patch
  matrix is larger, one matmul per tap, accumulated."""
  kh, kw, cin, cout = kernel.shape
  b = x.shape[0]
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  per_image = ho * wo * kh * kw * cin * x.dtype.itemsize
  chunk = _batch_chunk(b, per_image)

  def body(_, xc):
    taps = _taps(xc, kh, kw, 1, ho, wo)
    if per_image <= _PATCH_CHUNK_BYTES:
      y = jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * cin) @ kernel.reshape(-1, cout)
    else:
      y = sum(t.reshape(-1, cin) @ kernel[i // kw, i % kw] for i, t in enumerate(taps))
    return None, y.reshape(chunk, ho, wo, cout)

  _, y = jax.lax.scan(body, None, _split(xp, chunk))
  return y.reshape(b, ho, wo, cout)


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): a 3x3 'same' conv as 16 channel matmuls over
# 4x4 input tiles (stride 2), 2.25x fewer multiplies. Its transforms only add, subtract and
# halve, so float32 results differ from the direct conv by rounding (~1e-6 relative).
_WINO_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))  # kernel transform
_WINO_CHUNK_BYTES = 8 << 20  # per batch chunk, the transformed input (4x the chunk's input)


def _wino_rows(t, axis):
  """B^T along `axis` of a padded tensor: the 4 rows of each 4-row tile (stride 2),
  B^T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))."""
  n = t.shape[axis] - 2
  r = [jax.lax.slice_in_dim(t, a, a + n - 1, 2, axis) for a in range(4)]
  return [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]


def _wino_input(x):
  """(B, 2t, 2s, C), padded by 1 -> the transformed tiles (16, B*t*s, C)."""
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  v = jnp.stack([jnp.stack(_wino_rows(r, 2)) for r in _wino_rows(xp, 1)])
  return v.reshape(16, -1, x.shape[-1])


def _wino_kernel(kernel):
  """HWIO (3, 3, I, O) -> G k G^T per channel pair, (16, I, O)."""
  g = jnp.asarray(_WINO_G, kernel.dtype)
  u = jnp.einsum('xr,rsio,ys->xyio', g, kernel, g, precision='highest')
  return u.reshape(16, *kernel.shape[2:])


def _wino_tile_grad(g):
  """(B, 2t, 2s, O) -> (16, B*t*s, O): A g A^T per 2x2 output tile, the adjoint of
  `_wino_conv`'s output transform (A^T = ((1, 1, 1, 0), (0, 1, -1, -1)))."""
  b, h, w, o = g.shape
  g = g.reshape(b, h // 2, 2, w // 2, 2, o)
  rows = lambda a, i: jax.lax.index_in_dim(a, i, 2, keepdims=False)
  adj = lambda a0, a1: (a0, a0 + a1, a0 - a1, -a1)
  r = adj(rows(g, 0), rows(g, 1))  # each (b, t, s, 2, o)
  cols = lambda a, i: jax.lax.index_in_dim(a, i, 3, keepdims=False)
  return jnp.stack([jnp.stack(adj(cols(a, 0), cols(a, 1))) for a in r]).reshape(16, -1, o)


def _wino_conv(x, u):
  """The stride-1, (1, 1)-padded 3x3 conv of (B, H, W, C) `x` (H, W even) with the
  transformed kernel `u` (16, C, O)."""
  b, h, w, _ = x.shape
  m = jnp.matmul(_wino_input(x), u)
  m = m.reshape(4, 4, b, h // 2, w // 2, -1)
  o = jnp.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])  # A^T along rows
  o = jnp.stack([o[:, 0] + o[:, 1] + o[:, 2], o[:, 1] - o[:, 2] - o[:, 3]], 1)  # and columns
  return o.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, w, -1)


def _wino_chunks(x):
  return _batch_chunk(x.shape[0], 16 * x.shape[1] * x.shape[2] * x.shape[3], _WINO_CHUNK_BYTES)


def _wino_conv_chunked(x, u):
  """`_wino_conv` as a loop over batch chunks whose transformed tiles stay in cache."""
  b = x.shape[0]
  chunk = _wino_chunks(x)
  if chunk == b:
    return _wino_conv(x, u)
  _, y = jax.lax.scan(lambda _, xc: (None, _wino_conv(xc, u)), None, _split(x, chunk))
  return y.reshape(b, *x.shape[1:3], u.shape[-1])


def _wino_conv_bwd(x, kernel, g):
  """(dx, dkernel) of `_wino_conv(x, _wino_kernel(kernel))` for the cotangent `g`, in one
  loop over batch chunks: dx is the conv of g with the flipped, transposed kernel; dkernel is
  G^T (sum over tiles of the input tiles^T @ the output tiles' cotangents) G."""
  b = x.shape[0]
  u_t = _wino_kernel(jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  du_of = lambda xc, gc: jnp.einsum('tni,tno->tio', _wino_input(xc), _wino_tile_grad(gc))
  chunk = min(_wino_chunks(x), _wino_chunks(g))
  if chunk == b:
    dx, du = _wino_conv(g, u_t), du_of(x, g)
  else:

    def body(acc, xg):
      xc, gc = xg
      return acc + du_of(xc, gc), _wino_conv(gc, u_t)

    zeros = jnp.zeros((16, *kernel.shape[2:]), jnp.float32)
    du, dx = jax.lax.scan(body, zeros, (_split(x, chunk), _split(g, chunk)))
    dx = dx.reshape(x.shape)
  gm = jnp.asarray(_WINO_G, jnp.float32)
  dk = jnp.einsum('xr,xyio,ys->rsio', gm, du.reshape(4, 4, *du.shape[1:]), gm, precision='highest')
  return dx, dk


def _wino_applies(x, kernel, strides, padding):
  """Whether a float32 conv takes the Winograd path on CPU: 3x3, stride 1, 'same', even
  sizes of 16+, 32-256 channels in and out, one device. Measured against `_conv_patches` /
  XLA (forward, and forward + both gradients): 1.2-2x faster at 16x16-64x64 with 32-256
  channels, batch 8-250; slower at 8x8 and below (few tiles per kernel transform)."""
  _, h, w, _ = x.shape
  kh, kw, cin, cout = kernel.shape
  return (
    CPU_PATCH_MATMULS
    and (kh, kw, strides) == (3, 3, 1)
    and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
    and h % 2 == 0
    and w % 2 == 0
    and min(h, w) >= 16
    and 32 <= cin <= 256
    and 32 <= cout <= 256
    and _loops_allowed()
  )


# XLA:CPU's convolutions with 32-64 channels in and out run at 50-80 GFLOP/s here; the same
# conv as `_conv_patches` runs 1.1-1.35x faster (3x3 at 16x16-64x64, batch 8-250), wider ones
# do not. Only where `_loops_allowed`.
def _conv_fast(x, kernel, strides, padding):
  """`_conv` of float32 operands, on one CPU device by Winograd or `_conv_patches` where
  that is faster."""
  kh, kw, cin, cout = kernel.shape
  if _wino_applies(x, kernel, strides, padding):
    return jax.lax.platform_dependent(
      x,
      kernel,
      cpu=lambda x, k: _wino_conv_chunked(x, _wino_kernel(k)),
      default=lambda x, k: _conv(x, k, strides, padding),
    )
  # The sub-pixel Upsample's input gradient is a 2x2 conv from 4x the channels: XLA:CPU ran
  # it 1.1-4x slower than the patch matmuls (4.0 vs 1.9 ms at 8x8x256 -> 64, 36 vs 9.7 ms
  # at 32x32x256 -> 64, batch 8-250), its worst case in the step. (The forward, 4x the
  # channels out, is faster in XLA's.)
  subpixel_grad = (kh, kw) == (2, 2) and cin > cout >= 32
  if not (
    CPU_PATCH_MATMULS
    and strides == 1
    and (((kh, kw) == (3, 3) and 32 <= cin <= 64 and 32 <= cout <= 64) or subpixel_grad)
    and _loops_allowed()
  ):
    return _conv(x, kernel, strides, padding)
  return jax.lax.platform_dependent(
    x,
    kernel,
    cpu=lambda x, k: _conv_patches(x, k, padding),
    default=lambda x, k: _conv(x, k, strides, padding),
  )


def _kernel_grad_chunked(x, g, kernel_shape, strides, padding):
  """d(loss)/d(kernel) of `_conv` as a loop over batch chunks, each a patch-matrix matmul
  (B_c*Ho*Wo, kh*kw*Cin)^T @ (B_c*Ho*Wo, Cout) accumulated in float32. A chunk's patch matrix
  is sized to stay in cache (<= 4 MiB); where one image's is larger, one matmul per tap.
  Without `_loops_allowed`: one matmul per tap over the whole batch."""
  kh, kw, cin, cout = kernel_shape
  b, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  dot = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  if not _loops_allowed():
    g2 = g.reshape(-1, cout)
    per_tap = [dot(t.reshape(-1, cin).T, g2) for t in _taps(xp, kh, kw, strides, ho, wo)]
    return jnp.stack(per_tap).reshape(kernel_shape)
  per_image = ho * wo * kh * kw * cin * x.dtype.itemsize
  chunk = _batch_chunk(b, per_image)

  def body(acc, xg):
    xc, gc = xg
    g2 = gc.reshape(-1, cout)
    if per_image <= _PATCH_CHUNK_BYTES:
      cols = jnp.concatenate(_taps(xc, kh, kw, strides, ho, wo), axis=-1).reshape(-1, kh * kw * cin)
      return acc + dot(cols.T, g2).reshape(kernel_shape), None
    per_tap = [dot(t.reshape(-1, cin).T, g2) for t in _taps(xc, kh, kw, strides, ho, wo)]
    return acc + jnp.stack(per_tap).reshape(kernel_shape), None

  zeros = jnp.zeros(kernel_shape, jnp.float32)
  acc, _ = jax.lax.scan(body, zeros, (_split(xp, chunk), _split(g, chunk)))
  return acc


# XLA:CPU lowers a conv's kernel gradient as a second convolution with batch and features
# swapped, behind transposes of both operands; at the demo's and the small reference config's
# shapes that runs at 2-35 GFLOP/s, against 70-170 for the forward, and the sub-pixel
# Upsample's 2x2 conv takes 70x its forward (725 ms at the demo's 16x16x64). The patch matmuls
# above run 1.5-3.6x faster at the 3x3 shapes (`bench_stage1.py --conv_profile`), 70x at the
# 2x2 one. On CPU (`platform_dependent`) every conv with 16+ output channels, float32 or bf16,
# takes them; narrower ones (conv_out to RGB) and accelerators keep XLA's.
def _kernel_grad(x, g, kernel, strides, padding):
  """d(loss)/d(kernel) of `_conv(x, kernel)` for the cotangent `g` (x's dtype)."""
  native = lambda x, g: jax.vjp(lambda k: _conv(x, k, strides, padding), kernel)[1](g)[0]
  if not CPU_PATCH_MATMULS or kernel.shape[-1] < 16:
    return native(x, g)
  ours = lambda x, g: _kernel_grad_chunked(x, g, kernel.shape, strides, padding).astype(
    kernel.dtype
  )
  return jax.lax.platform_dependent(x, g, cpu=ours, default=native)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _float32_conv(x, kernel, strides, padding):
  return _conv_fast(x, kernel, strides, padding)


def _float32_conv_fwd(x, kernel, strides, padding):
  return _conv_fast(x, kernel, strides, padding), (x, kernel)


def _float32_conv_bwd(strides, padding, res, g):
  x, kernel = res
  if _wino_applies(x, kernel, strides, padding):

    def native(x, kernel, g):
      return jax.vjp(lambda a, k: _conv(a, k, strides, padding), x, kernel)[1](g)

    return jax.lax.platform_dependent(x, kernel, g, cpu=_wino_conv_bwd, default=native)
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  if strides == 1 and max(pt, pb) < kh and max(pl, pr) < kw:
    # A stride-1 conv's input gradient is the conv of g with the flipped, transposed kernel.
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = _conv_fast(g, flipped, 1, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
  else:
    (dx,) = jax.vjp(lambda a: _conv(a, kernel, strides, padding), x)[1](g)
  return dx, _kernel_grad(x, g, kernel, strides, padding)


_float32_conv.defvjp(_float32_conv_fwd, _float32_conv_bwd)


# Plain autodiff through a bf16 conv that accumulates into float32 runs its backward in
# float32: the float32 cotangent promotes the bf16 operand, and both backward convs run on
# float32 operands. `mixed_conv` keeps them in the operands' dtype, as `mixed_einsum` does
# for the GPT's dots. The backward returns bf16 (the operands' cotangents); on XLA:CPU
# bf16 convs time exactly like float32 ones at every shape measured (widened inside), so they
# accumulate in float32 there; accelerators accumulate bf16 convs in float32 anyway.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def mixed_conv(x, kernel, strides, padding):
  """NHWC x HWIO conv of same-dtype operands, accumulated and returned in float32."""
  return _conv(x, kernel, strides, padding, jnp.float32)


def _mixed_conv_fwd(x, kernel, strides, padding):
  return mixed_conv(x, kernel, strides, padding), (x, kernel)


def _mixed_conv_bwd(strides, padding, res, g):
  x, kernel = res
  g = g.astype(x.dtype)
  (dx,) = jax.vjp(lambda a: _conv(a, kernel, strides, padding), x)[1](g)
  return dx, _kernel_grad(x, g, kernel, strides, padding)


mixed_conv.defvjp(_mixed_conv_fwd, _mixed_conv_bwd)


def conv2d(x, kernel, strides=1, padding=((0, 0), (0, 0))):
  """NHWC x HWIO convolution with explicit ((top, bottom), (left, right)) padding.

  float32 operands: the exact float32 conv. Lower precision: `mixed_conv` (float32 result).
  Either way, on CPU the kernel gradient of 16+ output channels is `_kernel_grad_chunked`'s.

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
      return mixed_conv(x, kernel, strides, padding)
    return _float32_conv(x, kernel, strides, padding)
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  ho = (xp.shape[1] - kh) // strides + 1
  wo = (xp.shape[2] - kw) // strides + 1
  cols = jnp.concatenate(_taps(xp, kh, kw, strides, ho, wo), axis=-1)
  cols, kernel = cols.reshape(-1, kh * kw * cin), kernel.reshape(kh * kw * cin, cout)
  y = mixed_einsum('nk,ko->no', cols, kernel) if mixed else cols @ kernel
  return y.reshape(x.shape[0], ho, wo, cout)


# For each output phase (0: even rows, 1: odd), which of a 3x3 kernel's rows land on each row
# of a 2x2 window over the low-resolution input: even output rows 2i see x[i-1] (kernel row 0)
# and x[i] (rows 1, 2); odd rows 2i+1 see x[i] (rows 0, 1) and x[i+1] (row 2). Same for columns.
_SUBPIXEL_ROWS = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def upsample_conv2d(x, kernel):
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
  y = conv2d(x, k2, 1, ((1, 1), (1, 1))).reshape(b, h + 1, w + 1, 2, 2, cout)
  # Phase (a, c) at (i, j) is window (i + a, j + c); out[2i + a, 2j + c] interleaves them.
  rows = [jnp.stack([y[:, a : a + h, c : c + w, a, c] for c in range(2)], 3) for a in range(2)]
  return jnp.stack(rows, 2).reshape(b, 2 * h, 2 * w, cout)


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
      y = upsample_conv2d(x.astype(self.dtype), kernel)
    else:
      y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, pad)
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

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    in_channels = x.shape[-1]
    h = swish(Normalize('norm1', self.dtype)(x))
    h = Conv(self.out_channels, 3, dtype=self.dtype, name='conv1')(h)
    h = swish(Normalize('norm2', self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)
    h = Conv(self.out_channels, 3, dtype=self.dtype, name='conv2')(h)
    if in_channels != self.out_channels:
      x = Conv(
        self.out_channels, 1, padding=((0, 0), (0, 0)), dtype=self.dtype, name='nin_shortcut'
      )(x)
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

  @nn.compact
  def __call__(self, x):
    return Conv(x.shape[-1], 3, strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype, name='conv')(
      x
    )


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv (computed as one sub-pixel conv)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv(x.shape[-1], 3, dtype=self.dtype, upsample=True, name='conv')(x)


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

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    # static_argnums counts `self`: `deterministic` (a Python bool) is argument 2.
    resnet = remat_module(ResnetBlock, self.remat_policy, static_argnums=(2,))
    attn = remat_module(AttnBlock, self.remat_policy)
    for j in range(self.num_blocks):
      x = resnet(self.out_channels, self.dropout, self.dtype, name=f'block_{j}')(x, deterministic)
      if self.use_attn:
        x = attn(self.dtype, name=f'attn_{j}')(x)
    if self.resample == 'down':
      x = Downsample(self.dtype, name='downsample')(x)
    elif self.resample == 'up':
      x = Upsample(self.dtype, name='upsample')(x)
    return x


class MidBlock(nn.Module):
  channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    resnet = remat_module(ResnetBlock, self.remat_policy, static_argnums=(2,))
    attn = remat_module(AttnBlock, self.remat_policy)
    x = resnet(self.channels, self.dropout, self.dtype, name='block_1')(x, deterministic)
    x = attn(self.dtype, name='attn_1')(x)
    return resnet(self.channels, self.dropout, self.dtype, name='block_2')(x, deterministic)


def level_resolutions(resolution: int, ch_mult: Sequence[int]):
  """Configured resolution at each level (attention placement follows it, not the input)."""
  return [resolution // 2**i for i in range(len(ch_mult))]
