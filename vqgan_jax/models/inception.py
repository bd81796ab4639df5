"""The FID Inception network (pytorch-fid 0.3.0's `fid_inception_v3`) in Flax, NHWC.

pytorch-fid ports TensorFlow's `inception-2015-12-05` graph, the network every published FID
is measured with, onto torchvision's InceptionV3 and patches the blocks where the TF graph
differs: FIDInceptionA/C and FIDInceptionE_1 average-pool without counting the zero padding
(TF's `SAME` average pool), FIDInceptionE_2 (Mixed_7c) max-pools instead, and `fc` has 1008
outputs. Every conv is conv (no bias) + BatchNorm(eps=0.001, eval mode) + ReLU. The 2048-d
pool3 features (the global average of Mixed_7c) are what FID compares.

`preprocess` reproduces `pytorch_fid.inception.InceptionV3(resize_input=True,
normalize_input=True)` on images mapped to [0, 1]: torch's `F.interpolate(size=(299, 299),
mode='bilinear', align_corners=False)`, which is NOT antialiased when it shrinks an image
(jax.image.resize antialiases by default, and FID moves with the resize), then 2x - 1.

Parameter names are the torch state-dict keys with '.' -> '/' and flax's leaf names:

  torch key                                  flax variables path
  <block>.conv.weight  [O, I, kh, kw]        params/<block>/conv/kernel  [kh, kw, I, O]
  <block>.bn.weight / .bn.bias               params/<block>/bn/scale / bias
  <block>.bn.running_mean / running_var      batch_stats/<block>/bn/mean / var
  <block>.bn.num_batches_tracked             (not used in eval mode)
  fc.weight [1008, 2048] / fc.bias           params/fc/kernel [2048, 1008] / bias

where <block> is e.g. `Conv2d_1a_3x3` or `Mixed_6b.branch7x7dbl_3` (`Mixed_6b/branch7x7dbl_3`).
Everything runs in float32 with HIGHEST matmul/conv precision: FID is a difference of large
numbers, and TF32/bf16 passes on accelerators would move it.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 0.001
_HIGHEST = jax.lax.Precision.HIGHEST


def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The (out_size, in_size) matrix of torch's 1-D linear interpolation, align_corners=False.

  The formula of ATen's `upsample_bilinear2d` (used for both up- and downsampling, so a
  shrink takes 2 taps, no antialias): src = (dst + 0.5) * in/out - 0.5, clamped at 0; the
  taps are floor(src) and the next pixel (the last pixel repeats), weighted by the fraction.
  """
  # float32, as ATen computes it for float images; its AVX2/AVX-512 kernels contract
  # scale * (dst + 0.5) - 0.5 into one FMA (one rounding; emulated in float64 here). The
  # rounding of the source position is part of the result: without the FMA the weights
  # differ by up to half an ulp of the position (1e-6 at 64 -> 299).
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32) + f32(0.5)
  src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(f32)
  src = np.maximum(src, f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = np.clip(src - i0.astype(f32), f32(0), f32(1))
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), f32(1) - lam)
  np.add.at(m, (rows, i1), lam)
  return m.astype(np.float32)


def resize_bilinear_torch(x: Array, size: tuple[int, int]) -> Array:
  """NHWC `F.interpolate(mode='bilinear', align_corners=False)` to `size`, as two matmuls."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x  # torch's scale-1 interpolation is the identity too
  mh = jnp.asarray(torch_bilinear_matrix(h, size[0]))
  mw = jnp.asarray(torch_bilinear_matrix(w, size[1]))
  x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=_HIGHEST)
  return jnp.einsum('pw,bowc->bopc', mw, x, precision=_HIGHEST)


def preprocess(images: Array) -> Array:
  """NHWC images in [-1, 1] (1 or 3 channels, any size) -> the network's (B, 299, 299, 3).

  The same steps, in the same order, as pytorch-fid on the images mapped to [0, 1]: resize,
  then 2x - 1 (gray is repeated to RGB first, as pytorch-fid's loader converts to RGB).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Inception wants NHWC images with 1 or 3 channels, got {images.shape}')
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = (x + 1.0) * 0.5
  x = resize_bilinear_torch(x, (INPUT_SIZE, INPUT_SIZE))
  return 2.0 * x - 1.0


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv without bias, BatchNorm(eps=0.001) in eval mode, ReLU."""

  features: int
  kernel_size: int | Sequence[int] = 1
  strides: int = 1
  padding: int | Sequence[int] = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(
      self.features,
      _pair(self.kernel_size),
      strides=_pair(self.strides),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=_HIGHEST,
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x)
    return nn.relu(x)


def _avg_pool_same(x: Array) -> Array:
  # F.avg_pool2d(3, stride 1, padding 1, count_include_pad=False): TF's SAME average pool.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: Array, strides: int, padding: int) -> Array:
  p = ((padding, padding),) * 2  # flax pads max pools with -inf, as torch does
  return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=p)


class FIDInceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv2d(64, name='branch1x1')(x)
    b5 = BasicConv2d(48, name='branch5x5_1')(x)
    b5 = BasicConv2d(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv2d(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv2d(self.pool_features, name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (unpatched by pytorch-fid)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv2d(384, 3, strides=2, name='branch3x3')(x)
    bd = BasicConv2d(64, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv2d(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


class FIDInceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, name='branch1x1')(x)
    b7 = BasicConv2d(c7, name='branch7x7_1')(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv2d(c7, name='branch7x7dbl_1')(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv2d(192, name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (unpatched by pytorch-fid)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv2d(192, name='branch3x3_1')(x)
    b3 = BasicConv2d(320, 3, strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv2d(192, name='branch7x7x3_1')(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv2d(192, 3, strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class FIDInceptionE(nn.Module):
  """FIDInceptionE_1 (Mixed_7b: average pool without padding) or _2 (Mixed_7c: max pool)."""

  max_pool: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv2d(320, name='branch1x1')(x)
    b3 = BasicConv2d(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
      ],
      axis=-1,
    )
    bd = BasicConv2d(448, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate(
      [
        BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_same(x)
    bp = BasicConv2d(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FC(nn.Module):
  """torch's `fc` (Linear 2048 -> 1008); also returns the logits without the bias."""

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    bias = self.param('bias', nn.initializers.zeros, (NUM_CLASSES,))
    unbiased = jnp.matmul(x, kernel, precision=_HIGHEST)
    return unbiased + bias, unbiased


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception; images NHWC in [-1, 1] -> dict of float32 arrays.

  Returns {'features': (B, 2048) pool3, 'logits': (B, 1008) `fc` with its bias,
  'logits_unbiased': (B, 1008) pool3 @ fc.weight.T, the logits the TF Inception Score code
  (and torch-fidelity's default) takes the softmax of}. Variables: 'params' and
  'batch_stats' (BatchNorm running statistics, read only).
  """

  @nn.compact
  def __call__(self, images: Array) -> dict[str, Array]:
    x = preprocess(images)
    x = BasicConv2d(32, 3, strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv2d(32, 3, name='Conv2d_2a_3x3')(x)
    x = BasicConv2d(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool(x, 2, 0)
    x = BasicConv2d(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, 3, name='Conv2d_4a_3x3')(x)
    x = _max_pool(x, 2, 0)
    x = FIDInceptionA(32, name='Mixed_5b')(x)
    x = FIDInceptionA(64, name='Mixed_5c')(x)
    x = FIDInceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = FIDInceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = FIDInceptionE(max_pool=False, name='Mixed_7b')(x)
    x = FIDInceptionE(max_pool=True, name='Mixed_7c')(x)
    features = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)): pool3
    logits, unbiased = FC(name='fc')(features)
    return {'features': features, 'logits': logits, 'logits_unbiased': unbiased}


def variable_shapes() -> dict[str, tuple[int, ...]]:
  """'params/Mixed_5b/branch1x1/conv/kernel' -> shape, for every variable of the network."""
  abstract = jax.eval_shape(
    FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
  )
  flat = jax.tree_util.tree_flatten_with_path(dict(abstract))[0]
  return {'/'.join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def inception_apply(variables, images: Array) -> dict[str, Array]:
  """Pure forward pass, jit-able with `variables` ({'params', 'batch_stats'}) as an argument."""
  return FIDInceptionV3().apply(jax.lax.stop_gradient(variables), images)
