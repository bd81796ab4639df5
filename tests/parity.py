"""Shared pieces of the parity tests against the original implementation.

Importing this module skips the importing test module (with the install hint) where the
`[reference]` extra is missing, and installs the torchvision stand-in before anything
imports torchvision.
"""

import bounds
import numpy as np
import pytest

from vqgan_jax.convert.torch_ckpt import INSTALL_HINT

HINT = f'the original implementation is not installed: {INSTALL_HINT}'
torch = pytest.importorskip('torch', reason=HINT)
pytest.importorskip('taming', reason=HINT)

from vqgan_jax.testing import reference as R  # noqa: E402

R.install_torchvision_standin()
pytest.importorskip('pytorch_lightning', reason=HINT)

TOL = 1e-4  # max abs error relative to the output scale


class Recorder:
  """Checks outputs against the original's, records each error, prints them all at the end
  of the module (`report` is an autouse module fixture: assign it to a module global)."""

  def __init__(self, title):
    self.title, self.errors, self.info = title, {}, {}

  def check(self, name, ours, ref, tol=TOL, floor=1e-2):
    """max |ours - ref| <= tol * max(max |ref|, floor); records the error."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f'{name}: shape {ours.shape} vs {ref.shape}'
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, floor)
    self.errors[name] = (err, scale)
    bounds.check(f'{name}: max abs error / scale {scale:.3g}', err / scale, tol)

  def check_original(self, name, ours, ref32, ref64, tol=TOL, floor=1e-2):
    """`check` against the original's float32 result; where that result is itself further
    than the tolerance from the original's float64 result (its float32 rounding on this CPU:
    oneDNN's kernels differ between CPUs with and without AVX2/AVX-512), against the float64
    one: ours must reproduce the original's arithmetic, not one CPU's rounding of it."""
    ref32, ref64 = np.asarray(ref32, np.float64), np.asarray(ref64, np.float64)
    scale = max(float(np.max(np.abs(ref64))) if ref64.size else 0.0, floor)
    own_err = float(np.max(np.abs(ref32 - ref64))) if ref64.size else 0.0
    if own_err > tol * scale:
      self.info[f'{name}: the original in float32 is off its float64 result by'] = (
        f'{own_err:.3g} (scale {scale:.3g}); compared with float64'
      )
      return self.check(f'{name} (vs the original in float64)', ours, ref64, tol, floor)
    return self.check(name, ours, ref32, tol, floor)

  def _report(self):
    yield
    width = max((len(k) for k in self.errors), default=0)
    lines = [
      f'{k:<{width}}  max abs err {e:9.2e}   scale {s:9.3g}   rel {e / s:9.2e}'
      for k, (e, s) in sorted(self.errors.items())
    ]
    print(f'\n{self.title}:\n' + '\n'.join(lines))
    print('\n'.join(f'{k}: {v}' for k, v in sorted(self.info.items())))

  @property
  def report(self):
    return pytest.fixture(scope='module', autouse=True, name='report')(self._report)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def images_uint8(seed, size, batch):
  """Smooth-ish uint8 images (upsampled noise plus fine noise)."""
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, (batch, size // 4, size // 4, 3)).astype(np.float32)
  hi = low.repeat(4, axis=1).repeat(4, axis=2) + rng.normal(0, 20, (batch, size, size, 3))
  return np.clip(hi, 0, 255).astype(np.uint8)
