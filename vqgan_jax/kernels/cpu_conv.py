"""The CPU convolution kernels: Winograd F(2x2, 3x3) and patch-matrix matmuls for the convs
and conv gradients where XLA:CPU's own are slow (`experiments/bench_stage1.py`).

Chosen by `conv_impl` (`train.conv_impl` in a config; `kernels.conv` dispatches):
  'xla'   XLA's own convs and conv gradients everywhere (benchmarks count a step's FLOPs
          with it: XLA's cost analysis counts a loop's body once, not once per iteration).
  'cpu'   the kernels below on CPU, looping over batch chunks sized to stay in cache. For one
          device (a loop over a sharded batch would hold collectives).
  'auto'  'cpu' on a one-device process; with several devices only the loop-free kernel
          gradients. Accelerators take XLA's convs under every choice (`platform_dependent`).
  'tuned' per conv shape and dtype, the candidate (XLA's, patch matmuls, Winograd) that
          measured fastest on this machine (`tune`: timed once, cached on disk); one device
          only ('auto' with several).
"""

import functools

import jax
import jax.numpy as jnp

from vqgan_jax.kernels import tune

IMPLS = ('auto', 'xla', 'cpu', 'tuned')


def lax_conv(x, kernel, strides, padding, preferred_element_type=None):
  """XLA's own NHWC x HWIO conv: every other path's fallback and reference."""
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (strides, strides),
    padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    preferred_element_type=preferred_element_type,
  )


_PATCH_CHUNK_BYTES = 4 << 20


def taps(xp, kh, kw, strides, ho, wo):
  """The kh*kw strided (B, ho, wo, C) views of padded `xp` that a conv's taps multiply."""
  return [
    xp[:, i : i + strides * (ho - 1) + 1 : strides, j : j + strides * (wo - 1) + 1 : strides]
    for i in range(kh)
    for j in range(kw)
  ]


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f'conv_impl={impl!r}: use one of {IMPLS}')


def _loops_allowed(impl: str) -> bool:
  """Whether the CPU conv paths may loop over batch chunks: 'cpu', or 'auto' / 'tuned' on one
  device. With a sharded batch the loop would hold collectives, and XLA:CPU's in-process
  collectives deadlocked in one on the two-process tests' 2x2 mesh."""
  return impl == 'cpu' or (impl in ('auto', 'tuned') and jax.device_count() == 1)


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
    views = taps(xc, kh, kw, 1, ho, wo)
    if per_image <= _PATCH_CHUNK_BYTES:
      y = jnp.concatenate(views, axis=-1).reshape(-1, kh * kw * cin) @ kernel.reshape(-1, cout)
    else:
      y = sum(t.reshape(-1, cin) @ kernel[i // kw, i % kw] for i, t in enumerate(views))
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


def wino_conv_bwd(x, kernel, g):
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


def wino_applies(x, kernel, strides, padding, impl):
  """Whether a float32 conv takes the Winograd path on CPU: 3x3, stride 1, 'same', even
  sizes of 16+, 32-256 channels in and out, one device. Measured against `_conv_patches` /
  XLA (forward, and forward + both gradients): 1.2-2x faster at 16x16-64x64 with 32-256
  channels, batch 8-250; slower at 8x8 and below (few tiles per kernel transform)."""
  _, h, w, _ = x.shape
  kh, kw, cin, cout = kernel.shape
  return (
    (kh, kw, strides) == (3, 3, 1)
    and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
    and h % 2 == 0
    and w % 2 == 0
    and min(h, w) >= 16
    and 32 <= cin <= 256
    and 32 <= cout <= 256
    and impl != 'tuned'
    and _loops_allowed(impl)
  )


# XLA:CPU's convolutions with 32-64 channels in and out run at 50-80 GFLOP/s here; the same
# conv as `_conv_patches` runs 1.1-1.35x faster (3x3 at 16x16-64x64, batch 8-250), wider ones
# do not. Only where `_loops_allowed`.
def conv_fast(x, kernel, strides, padding, impl):
  """`_conv` of float32 operands, on one CPU device by Winograd or `_conv_patches` where
  that is faster."""
  if impl == 'tuned':
    if _loops_allowed(impl):
      return _tuned_conv(x, kernel, strides, padding)
    impl = 'auto'
  kh, kw, cin, cout = kernel.shape
  if wino_applies(x, kernel, strides, padding, impl):
    return jax.lax.platform_dependent(
      x,
      kernel,
      cpu=lambda x, k: _wino_conv_chunked(x, _wino_kernel(k)),
      default=lambda x, k: lax_conv(x, k, strides, padding),
    )
  # The sub-pixel Upsample's input gradient is a 2x2 conv from 4x the channels: XLA:CPU ran
  # it 1.1-4x slower than the patch matmuls (4.0 vs 1.9 ms at 8x8x256 -> 64, 36 vs 9.7 ms
  # at 32x32x256 -> 64, batch 8-250), its worst case in the step. (The forward, 4x the
  # channels out, is faster in XLA's.)
  subpixel_grad = (kh, kw) == (2, 2) and cin > cout >= 32
  if not (
    strides == 1
    and (((kh, kw) == (3, 3) and 32 <= cin <= 64 and 32 <= cout <= 64) or subpixel_grad)
    and _loops_allowed(impl)
  ):
    return lax_conv(x, kernel, strides, padding)
  return jax.lax.platform_dependent(
    x,
    kernel,
    cpu=lambda x, k: _conv_patches(x, k, padding),
    default=lambda x, k: lax_conv(x, k, strides, padding),
  )


def _kernel_grad_chunked(x, g, kernel_shape, strides, padding, loops):
  """d(loss)/d(kernel) of `_conv` as a loop over batch chunks, each a patch-matrix matmul
  (B_c*Ho*Wo, kh*kw*Cin)^T @ (B_c*Ho*Wo, Cout) accumulated in float32. A chunk's patch matrix
  is sized to stay in cache (<= 4 MiB); where one image's is larger, one matmul per tap.
  Without `loops`: one matmul per tap over the whole batch."""
  kh, kw, cin, cout = kernel_shape
  b, ho, wo, _ = g.shape
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  dot = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  if not loops:
    g2 = g.reshape(-1, cout)
    per_tap = [dot(t.reshape(-1, cin).T, g2) for t in taps(xp, kh, kw, strides, ho, wo)]
    return jnp.stack(per_tap).reshape(kernel_shape)
  per_image = ho * wo * kh * kw * cin * x.dtype.itemsize
  chunk = _batch_chunk(b, per_image)

  def body(acc, xg):
    xc, gc = xg
    g2 = gc.reshape(-1, cout)
    if per_image <= _PATCH_CHUNK_BYTES:
      cols = jnp.concatenate(taps(xc, kh, kw, strides, ho, wo), axis=-1).reshape(-1, kh * kw * cin)
      return acc + dot(cols.T, g2).reshape(kernel_shape), None
    per_tap = [dot(t.reshape(-1, cin).T, g2) for t in taps(xc, kh, kw, strides, ho, wo)]
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
def kernel_grad(x, g, kernel, strides, padding, impl):
  """d(loss)/d(kernel) of `lax_conv(x, kernel)` for the cotangent `g` (x's dtype)."""
  native = lambda x, g: jax.vjp(lambda k: lax_conv(x, k, strides, padding), kernel)[1](g)[0]
  if impl == 'xla' or kernel.shape[-1] < 16:
    return native(x, g)
  if impl == 'tuned':
    if _loops_allowed(impl):
      return _tuned_kernel_grad(x, g, kernel, strides, padding)
    impl = 'auto'
  loops = _loops_allowed(impl)
  ours = lambda x, g: _kernel_grad_chunked(x, g, kernel.shape, strides, padding, loops).astype(
    kernel.dtype
  )
  return jax.lax.platform_dependent(x, g, cpu=ours, default=native)


# conv_impl='tuned': the candidates of each direction, as functions of the operands alone (no
# tracer of the caller's is closed over: `tune.choose` may run them eagerly while tracing).
def _wino_shape(x_shape, k_shape, strides, padding):
  return (
    tuple(k_shape[:2]) == (3, 3)
    and strides == 1
    and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
    and x_shape[1] % 2 == 0
    and x_shape[2] % 2 == 0
    and min(x_shape[1:3]) >= 4
  )


def conv_candidates(x_shape, k_shape, strides, padding):
  """{name: fn(x, kernel)} of the float32 forward conv."""
  out = {'xla': lambda x, k: lax_conv(x, k, strides, padding)}
  if strides == 1:
    out['patches'] = lambda x, k: _conv_patches(x, k, padding)
  if _wino_shape(x_shape, k_shape, strides, padding):
    out['wino'] = lambda x, k: _wino_conv_chunked(x, _wino_kernel(k))
  return out


def kernel_grad_candidates(x_shape, k_shape, dtype, strides, padding):
  """{name: fn(x, g)} of the kernel gradient (its value does not depend on the kernel)."""
  zeros = lambda: jnp.zeros(k_shape, dtype)
  out = {
    'xla': lambda x, g: jax.vjp(lambda k: lax_conv(x, k, strides, padding), zeros())[1](g)[0],
    'patches': lambda x, g: _kernel_grad_chunked(x, g, k_shape, strides, padding, True).astype(
      dtype
    ),
  }
  if jnp.dtype(dtype) == jnp.float32 and _wino_shape(x_shape, k_shape, strides, padding):
    out['wino'] = lambda x, g: wino_conv_bwd(x, zeros(), g)[1]
  return out


def _tuned(direction, a, b, k_shape, strides, padding, candidates):
  native = candidates['xla']
  if jax.default_backend() != 'cpu':  # accelerators: XLA's convs, nothing to time
    return native(a, b)
  name = tune.choose(direction, a.dtype, a.shape, k_shape, strides, padding, candidates)
  if name == 'xla':
    return native(a, b)
  return jax.lax.platform_dependent(a, b, cpu=candidates[name], default=native)


def _tuned_conv(x, kernel, strides, padding):
  candidates = conv_candidates(x.shape, kernel.shape, strides, padding)
  return _tuned('fwd', x, kernel, kernel.shape, strides, padding, candidates)


def _tuned_kernel_grad(x, g, kernel, strides, padding):
  candidates = kernel_grad_candidates(x.shape, kernel.shape, kernel.dtype, strides, padding)
  return _tuned('kernel_grad', x, g, kernel.shape, strides, padding, candidates)
