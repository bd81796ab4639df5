"""The convolution kernels (`vqgan_jax/kernels`): every CPU path (Winograd, patch matmuls,
the loop-free kernel gradient) against lax.conv_general_dilated and its autodiff, and the
sub-pixel upsample conv against the original's repeat-then-conv."""

import json
import os

import bounds
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_transformer
from configs import fashion_mnist_vqgan
from vqgan_jax import validate
from vqgan_jax.kernels import conv
from vqgan_jax.kernels import cpu_conv
from vqgan_jax.kernels import dtype_choice
from vqgan_jax.kernels import tune
from vqgan_jax.models import gpt_load
from vqgan_jax.models import vqgan_load
from vqgan_jax.validate import ConfigError


def _magnitudes(conv_fn, x, kernel, ct):
  """The sums of |terms| behind a conv's output, input gradient and kernel gradient (for
  `bounds.check_sums_close`): the same conv and its VJP on the operands' absolute values."""
  y, vjp = jax.vjp(conv_fn, jnp.abs(x), jnp.abs(kernel))
  return (y, *vjp(jnp.abs(ct)))


def _impl(loops):
  """'cpu' loops over batch chunks; 'auto' does not on the suite's 8 devices."""
  assert jax.device_count() > 1, 'conftest.py should give 8 fake CPU devices'
  return 'cpu' if loops else 'auto'


@pytest.mark.parametrize(
  'shape,k,stride,pad,chunk_bytes',
  [
    ((6, 8, 8, 5, 16), 3, 1, ((1, 1), (1, 1)), 4 << 20),  # one chunk of the whole batch
    ((6, 8, 8, 5, 16), 3, 1, ((1, 1), (1, 1)), 25000),  # three chunks of two images
    ((4, 9, 7, 3, 24), 3, 2, ((0, 1), (0, 1)), 100),  # per-tap matmuls; Downsample's padding
    ((2, 8, 8, 4, 16), 4, 2, ((1, 1), (1, 1)), 4 << 20),  # the discriminator's 4x4 stride 2
    ((3, 5, 5, 8, 16), 1, 1, ((0, 0), (0, 0)), 4 << 20),  # nin_shortcut
    ((4, 8, 8, 32, 48), 3, 1, ((1, 1), (1, 1)), 150000),  # patch-matmul forward, 2 chunks
    ((4, 8, 8, 48, 32), 3, 1, ((1, 1), (1, 1)), 50000),  # ... one matmul per tap
  ],
)
@pytest.mark.parametrize('loops', [True, False], ids=['one_device', 'sharded'])
def test_cpu_conv_paths_equal_xla_conv_and_its_gradients(
  shape, k, stride, pad, chunk_bytes, loops, monkeypatch
):
  """The CPU conv paths (patch-matmul forward and input gradient, chunked kernel gradient; the
  loop-free kernel gradient of a sharded batch) equal lax.conv_general_dilated and its
  autodiff, for every chunking branch, stride and padding the models use. The suite runs on
  8 devices: 'auto' takes the loop-free branch there, 'cpu' the looped one."""
  monkeypatch.setattr(cpu_conv, '_PATCH_CHUNK_BYTES', chunk_bytes)
  impl = _impl(loops)
  b, h, w, cin, cout = shape
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(b, h, w, cin), jnp.float32)
  kernel = jnp.asarray(rng.randn(k, k, cin, cout), jnp.float32)
  ref = lambda x, kk: jax.lax.conv_general_dilated(
    x, kk, (stride, stride), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  ours = lambda x, kk: conv.conv2d(x, kk, stride, pad, impl)
  y = ref(x, kernel)
  ct = jnp.asarray(rng.randn(*y.shape), jnp.float32)
  loss = lambda f: lambda x, kk: jnp.sum(f(x, kk) * ct)
  mag = _magnitudes(ref, x, kernel, ct)
  _, ho, wo, _ = y.shape
  bounds.check_sums_close('forward', jax.jit(ours)(x, kernel), y, mag[0], k * k * cin)
  want = jax.jit(jax.grad(loss(ref), (0, 1)))(x, kernel)
  got = jax.jit(jax.grad(loss(ours), (0, 1)))(x, kernel)
  bounds.check_sums_close('input gradient', got[0], want[0], mag[1], k * k * cout)
  bounds.check_sums_close('kernel gradient', got[1], want[1], mag[2], b * ho * wo)


@pytest.mark.parametrize(
  'shape, chunk_bytes',
  [
    ((2, 16, 16, 32, 48), 8 << 20),  # the whole batch at once
    ((4, 16, 20, 48, 32), 30000),  # a loop over 4 chunks of 1 image, non-square
  ],
)
def test_winograd_conv_equals_xla_conv_and_its_gradients(shape, chunk_bytes, monkeypatch):
  """The Winograd F(2x2, 3x3) path (on one CPU device: 3x3 'same' convs, even sizes of 16+,
  32-256 channels) equals lax.conv_general_dilated, its input gradient and its kernel
  gradient to float32 rounding, with and without the loop over batch chunks."""
  monkeypatch.setattr(cpu_conv, '_WINO_CHUNK_BYTES', chunk_bytes)
  b, h, w, cin, cout = shape
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randn(b, h, w, cin), jnp.float32)
  kernel = jnp.asarray(rng.randn(3, 3, cin, cout) / np.sqrt(9 * cin), jnp.float32)
  pad = ((1, 1), (1, 1))
  assert cpu_conv.wino_applies(x, kernel, 1, pad, 'cpu')
  assert (cpu_conv._wino_chunks(x) == b) == (chunk_bytes > 1 << 20)
  ref = lambda x, kk: jax.lax.conv_general_dilated(
    x, kk, (1, 1), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest'
  )
  y = ref(x, kernel)
  ct = jnp.asarray(rng.randn(*y.shape), jnp.float32)
  loss = lambda f: lambda x, kk: jnp.sum(f(x, kk) * ct)
  ours = lambda x, kk: conv.conv2d(x, kk, 1, pad, 'cpu')
  np.testing.assert_allclose(jax.jit(ours)(x, kernel), y, rtol=1e-5, atol=2e-5)
  want = jax.jit(jax.grad(loss(ref), (0, 1)))(x, kernel)
  got = jax.jit(jax.grad(loss(ours), (0, 1)))(x, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize('loops', [True, False], ids=['one_device', 'sharded'])
def test_cpu_conv_paths_support_the_r1_double_backward(loops, monkeypatch):
  """R1 differentiates the discriminator's input gradient w.r.t. its kernels: through the
  custom VJP (patch-matmul convs included) this equals autodiff through lax.conv_general_dilated."""
  impl = _impl(loops)
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 8, 8, 3), jnp.float32)
  k1 = jnp.asarray(rng.randn(4, 4, 3, 32) * 0.2, jnp.float32)
  k2 = jnp.asarray(rng.randn(3, 3, 32, 32) * 0.2, jnp.float32)
  pad = ((1, 1), (1, 1))
  lax_conv = lambda x, k, s: jax.lax.conv_general_dilated(
    x, k, (s, s), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )

  def r1(conv):
    d = lambda ks, x: jnp.sum(jnp.tanh(conv(jax.nn.leaky_relu(conv(x, ks[0], 2), 0.2), ks[1], 1)))
    return lambda ks: jnp.sum(jnp.square(jax.grad(d, 1)(ks, x)))

  want = jax.jit(jax.grad(r1(lax_conv)))((k1, k2))
  got = jax.jit(jax.grad(r1(lambda x, k, s: conv.conv2d(x, k, s, pad, impl))))((k1, k2))
  for g, w in zip(got, want):  # float32 rounding, relative to the gradient's scale
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-6 * float(jnp.abs(w).max()))


@pytest.mark.parametrize('loops', [True, False], ids=['one_device', 'sharded'])
def test_bf16_conv_kernel_gradient_equals_float32_autodiff(loops, monkeypatch):
  """`mixed_conv`'s CPU kernel gradient (bf16 operands, float32 accumulation) equals float32
  autodiff on the same bf16-rounded operands and cotangent, to float32 rounding."""
  monkeypatch.setattr(cpu_conv, '_PATCH_CHUNK_BYTES', 12000)  # bf16: 2 chunks of 2 images
  impl = _impl(loops)
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(4, 6, 6, 8), jnp.bfloat16)
  kernel = jnp.asarray(rng.randn(3, 3, 8, 16), jnp.bfloat16)
  ct = jnp.asarray(rng.randn(4, 6, 6, 16), jnp.bfloat16).astype(jnp.float32)
  pad = ((1, 1), (1, 1))
  ref = lambda x, kk: jax.lax.conv_general_dilated(
    x, kk, (1, 1), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest'
  )
  want = jax.grad(lambda kk: jnp.sum(ref(x.astype(jnp.float32), kk) * ct))(
    kernel.astype(jnp.float32)
  )
  got = jax.jit(jax.grad(lambda kk: jnp.sum(conv.conv2d(x, kk, 1, pad, impl) * ct)))(kernel)
  assert got.dtype == jnp.bfloat16
  # The float32 sum is rounded once to bf16 (8 bits of mantissa).
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=1 / 128, atol=1e-3)


@pytest.mark.parametrize(
  'shape',
  [
    (2, 5, 7, 3, 4),  # odd sizes, the plain conv's kernel gradient (cout < 16)
    (2, 8, 8, 16, 16),  # the chunked kernel gradient
    (2, 1, 1, 8, 16),  # 1x1 input: the patch-matrix branch
    (2, 4, 4, 32, 32),  # the input gradient's 2x2 conv (128 -> 32 channels) by patch matmuls
  ],
)
@pytest.mark.parametrize('loops', [True, False], ids=['one_device', 'sharded'])
def test_upsample_conv_equals_nearest_upsample_then_conv(shape, loops, monkeypatch):
  """The sub-pixel Upsample conv equals the original's repeat-then-3x3-conv, in value and in
  both gradients, up to float32 rounding of the summed taps."""
  impl = _impl(loops)
  b, h, w, cin, cout = shape
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(b, h, w, cin), jnp.float32)
  kernel = jnp.asarray(rng.randn(3, 3, cin, cout) * 0.3, jnp.float32)
  ref = lambda x, kk: jax.lax.conv_general_dilated(
    jnp.repeat(jnp.repeat(x, 2, 1), 2, 2),
    kk,
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    precision='highest',
  )
  y = ref(x, kernel)
  assert y.shape == (b, 2 * h, 2 * w, cout)
  upsample = lambda x, kk: conv.upsample_conv2d(x, kk, impl)
  ct = jnp.asarray(rng.randn(*y.shape), jnp.float32)
  mag = _magnitudes(ref, x, kernel, ct)
  # The sub-pixel form sums the same products (its 2x2 kernel adds up to 4 taps first, +4
  # terms): per output 9 cin, per input-gradient entry 9 cout (each of the 4 phases' windows),
  # per kernel-gradient entry b (2h)(2w) products.
  bounds.check_sums_close('forward', upsample(x, kernel), y, mag[0], 9 * cin + 4)
  loss = lambda f: lambda x, kk: jnp.sum(f(x, kk) * ct)
  want = jax.jit(jax.grad(loss(ref), (0, 1)))(x, kernel)
  got = jax.jit(jax.grad(loss(upsample), (0, 1)))(x, kernel)
  bounds.check_sums_close('input gradient', got[0], want[0], mag[1], 4 * 9 * cout + 4)
  bounds.check_sums_close('kernel gradient', got[1], want[1], mag[2], 4 * b * h * w + 4)
  # bf16 operands: the kernel is combined in float32, then rounded once.
  yb = upsample(x.astype(jnp.bfloat16), kernel)
  assert yb.dtype == jnp.float32
  np.testing.assert_allclose(yb, y, rtol=0.05, atol=0.05 * float(jnp.abs(y).max()))


# conv_impl='tuned'. The suite never times: `tune.measure` is replaced by a fake timer that
# says which candidate "won", and counts its calls (timing would make the tests slow and their
# outcome machine-dependent). The suite's 8 fake devices would make 'tuned' fall back to
# 'auto', so `_loops_allowed` is patched to the one-device answer.
def _fake_timer(monkeypatch, winner, calls):
  def measure(candidates, args):
    calls.append(sorted(candidates))
    return {name: 1e-3 if name == winner else 2e-3 for name in candidates}

  monkeypatch.setattr(tune, 'measure', measure)


@pytest.fixture
def tuned_cache(tmp_path, monkeypatch):
  monkeypatch.setenv('VQGAN_JAX_CACHE', str(tmp_path))
  monkeypatch.setattr(tune, '_CACHE', {'path': None, 'entries': None})
  monkeypatch.setattr(cpu_conv, '_loops_allowed', lambda impl: impl != 'xla')
  return tmp_path / 'conv_choice.json'


def test_tuned_choice_is_cached_on_disk_keyed_by_machine_and_conv(tuned_cache, monkeypatch):
  calls = []
  _fake_timer(monkeypatch, 'patches', calls)
  pad = ((1, 1), (1, 1))
  candidates = cpu_conv.conv_candidates((2, 8, 8, 32), (3, 3, 32, 32), 1, pad)
  assert sorted(candidates) == ['patches', 'wino', 'xla']
  args = ('fwd', jnp.float32, (2, 8, 8, 32), (3, 3, 32, 32), 1, pad, candidates)
  assert tune.choose(*args) == 'patches' and tune.choose(*args) == 'patches'
  assert calls == [['patches', 'wino', 'xla']]  # timed once, then read
  data = json.loads(tuned_cache.read_text())
  (machine,) = data
  assert machine.startswith('+'.join(tune.cpu_flags()) or 'noflags')
  assert f'jax={jax.__version__}' in machine and f'cores={os.cpu_count()}' in machine
  assert data[machine] == {
    'fwd|float32|2x8x8x32|3x3x32x32|s1|p1:1,1:1': {
      'choice': 'patches',
      'ms': {'patches': 1.0, 'wino': 2.0, 'xla': 2.0},
    }
  }
  assert os.listdir(tuned_cache.parent) == ['conv_choice.json']  # no temporary left
  # A new process reads the file; another dtype, shape or direction is another entry.
  monkeypatch.setattr(tune, '_CACHE', {'path': None, 'entries': None})
  assert tune.choose(*args) == 'patches' and len(calls) == 1
  tune.choose('fwd', jnp.bfloat16, *args[2:])
  tune.choose('kernel_grad', *args[1:])
  tune.choose('fwd', jnp.float32, (4, 8, 8, 32), *args[3:])
  assert len(calls) == 4 and len(json.loads(tuned_cache.read_text())[machine]) == 4
  # Another CPU kind is measured again, next to the first one's entries.
  monkeypatch.setattr(tune, 'cpu_flags', lambda: ('avx2',))
  assert tune.choose(*args) == 'patches' and len(calls) == 5
  assert len(json.loads(tuned_cache.read_text())) == 2
  # A corrupt file is measured over, not an error.
  tuned_cache.write_text('{not json')
  monkeypatch.setattr(tune, '_CACHE', {'path': None, 'entries': None})
  assert tune.choose(*args) == 'patches' and len(calls) == 6


@pytest.mark.parametrize('winner', ['xla', 'patches', 'wino'])
def test_tuned_conv_runs_the_cached_choice(tuned_cache, winner, monkeypatch):
  """The program traced under 'tuned' is the one the (fake) timing chose, forward, input and
  kernel gradients, and it computes XLA's conv and gradients."""
  calls = []
  _fake_timer(monkeypatch, winner, calls)
  pad = ((1, 1), (1, 1))
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 8, 8, 32), jnp.float32)
  k = jnp.asarray(0.1 * rng.randn(3, 3, 32, 32), jnp.float32)
  loss = lambda impl: lambda x, k: jnp.sum(jnp.square(conv.conv2d(x, k, 1, pad, impl)))
  grad = jax.grad(loss('tuned'), (0, 1))
  text = str(jax.make_jaxpr(grad)(x, k))
  # fwd of x, fwd of g with the flipped kernel (same shapes: one entry), kernel gradient.
  assert len(calls) == 2
  choices = [r['choice'] for m in json.loads(tuned_cache.read_text()).values() for r in m.values()]
  assert choices == [winner, winner]
  # XLA's own: no CPU branch (`platform_dependent`); the patch matmuls loop over batch chunks,
  # Winograd does not at this batch (one chunk).
  assert ('branches_platforms' in text) == (winner != 'xla')
  assert ('scan' in text) == (winner == 'patches')
  want = jax.grad(loss('xla'), (0, 1))(x, k)
  for got, ref in zip(jax.jit(grad)(x, k), want):
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)
  assert len(calls) == 2  # the jitted trace read the cache


def test_auto_dtype_is_the_measured_faster_one_per_stage_and_cpu_kind(monkeypatch):
  resolve = dtype_choice.resolve
  assert resolve('float32', 'transformer', 'gpu') == 'float32'  # named dtypes pass through
  assert resolve('bfloat16', 'vqgan', 'cpu', ()) == 'bfloat16'
  assert resolve('auto', 'vqgan', 'gpu') == resolve('auto', 'transformer', 'tpu') == 'bfloat16'
  amx = ('avx2', 'avx512f', 'amx_bf16')
  assert [resolve('auto', s, 'cpu', amx) for s in dtype_choice.STAGES] == ['float32', 'bfloat16']
  assert resolve('auto', 'transformer', 'cpu', ('avx2',)) == 'bfloat16'
  assert resolve('auto', 'transformer', 'cpu', ()) == 'float32'  # unmeasured kind: float32
  with pytest.raises(ValueError, match='stage must be one of'):
    resolve('auto', 'gpt', 'cpu', ())
  # Built from configs: this process's backend and flags decide.
  monkeypatch.setattr(tune, 'cpu_flags', lambda: ('avx2',))
  c1 = fashion_mnist_vqgan.get_config('smoke')
  c1.train.dtype = 'auto'
  validate.validate_stage1(c1)
  assert vqgan_load.build_models(c1).vqgan.dtype == jnp.float32
  c2 = fashion_mnist_transformer.get_config('smoke')
  c2.train.dtype = 'auto'
  c2.stage1_config.update(c1.model.to_dict())
  layout = gpt_load.make_layout(c2)
  assert gpt_load.build_model(c2, layout).dtype == jnp.bfloat16
  c2.train.dtype = 'float16'
  with pytest.raises(ConfigError, match=r"dtype must be one of \('float32', 'bfloat16', 'auto'\)"):
    gpt_load.validate_config(c2)
