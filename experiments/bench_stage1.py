"""Stage-1 throughput: our fused train step and eval forward vs the original PyTorch step.

  python experiments/bench_stage1.py [--configs=demo,small_ref] [--dtypes=float32,bfloat16]
      [--iters=8] [--no_reference]

Prints one JSON object per line: `name`, `dtype`, `images_per_s`, `gflops_per_s` (XLA's
FLOP count of the compiled step over its median time), and with the [reference] extra
installed `original_images_per_s` and `ratio_vs_original` (ours / original). The original
is timed in the same process, right after ours, with the same config, batch and thread
count, replaying both optimizer passes of a PyTorch Lightning 1.0.8 iteration; with several
dtypes it is timed once per config, after all of ours.

  python experiments/bench_stage1.py --conv_profile

times one 3x3 conv's forward + input and kernel gradients instead (`CONV_SHAPES`: the demo's
and the small reference config's VQGAN and LPIPS shapes): XLA's own float32 conv gradient
(`float32_xla`), ours (`float32`: on CPU the kernel gradient by chunked patch matmuls,
`kernels.cpu_conv`'s chunked kernel gradient, and Winograd or patch matmuls for the forward
and input gradient where they apply) and bf16 operands with float32 accumulation
(`kernels.conv.mixed_conv`, its
kernel gradient chunked too), interleaved, best of 5.
"""

import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import machine
import numpy as np

from vqgan_jax import config_base
from vqgan_jax import parallel
from vqgan_jax.kernels import conv
from vqgan_jax.kernels import cpu_conv
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.train import stage1

_CONFIGS = flags.DEFINE_list('configs', ['demo', 'small_ref'], 'Which configs to time.')
_ITERS = flags.DEFINE_integer('iters', 8, 'Timed steps (median is reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
_THREADS = flags.DEFINE_integer('threads', 2, 'Torch threads for the original.')
_NO_REF = flags.DEFINE_bool('no_reference', False, 'Skip the original even if installed.')
_BATCH = flags.DEFINE_integer('batch', 0, 'Override the batch size (0: the config default).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes of our step.')
_CONV_IMPLS = flags.DEFINE_list(
  'conv_impls', ['auto'], "train.conv_impl of our step, each timed ('tuned': kernels/tune.py)."
)

_CONV_PROFILE = flags.DEFINE_bool('conv_profile', False, 'Time single convs instead.')
_OUT = flags.DEFINE_string(
  'out',
  '',
  'Results file under experiments/results/ (or a path) for the rows, with where they ran; '
  "default bench_stage1_cpu.jsonl (--conv_profile: bench_stage1_bf16_cpu.jsonl); '-': print only.",
)

# (batch, size, in, out): the demo (b32, 32x32) and small reference (b8, 64x64) shapes.
CONV_SHAPES = (
  (8, 64, 3, 64),
  (8, 64, 64, 64),
  (8, 32, 128, 128),
  (8, 16, 256, 256),
  (8, 8, 512, 512),
  (8, 4, 512, 512),
  (32, 32, 32, 32),
  (32, 32, 64, 64),
  (32, 16, 64, 64),
  (32, 8, 256, 256),
  (32, 4, 512, 512),
)

_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def bench_config(name, dtype='float32', conv_impl='auto'):
  """Our config for a benchmark name; all keep the GAN active (disc_start 0)."""
  if name == 'demo':
    demo = os.path.join(_CONFIGS_DIR, 'fashion_mnist_vqgan.py')
    c = config_base.load_sibling(demo, 'fashion_mnist_vqgan').get_config()
  else:
    c = config_base.stage1_base()
    if name == 'small_ref':  # the small reference config
      c.model.update(
        ch=64,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(16,),
        resolution=64,
        z_channels=256,
        n_embed=1024,
        embed_dim=256,
      )
      c.data.image_size = 64
      c.train.batch_size = 8
    elif name == 'f16':  # the ImageNet f16 architecture at 256x256 (for accelerators)
      c.data.image_size = 256
      c.train.batch_size = 8
    else:
      raise app.UsageError(f'unknown config {name!r}: demo, small_ref or f16')
  c.loss.disc_start = 0.0
  if _BATCH.value:
    c.train.batch_size = _BATCH.value
  c.train.dtype = dtype
  c.train.conv_impl = conv_impl
  return c


def _median_time(fn, iters, warmup):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_ours(config, iters, warmup):
  mesh = parallel.make_mesh(config.mesh)
  models = stage1.build_models(config)
  state, shardings = stage1.create_sharded_state(config, models, mesh, jax.random.PRNGKey(0))
  lpips_params = lpips_lib.load_pretrained_params()
  lpips_sh = jax.tree.map(lambda _: parallel.replicated(mesh), lpips_params)
  lpips_params = jax.device_put(lpips_params, lpips_sh)
  step = stage1.make_train_step(config, models, mesh, shardings, lpips_sh)
  evaluate = stage1.make_eval_step(models, mesh, shardings['params'], lpips_sh)
  b, s = config.train.batch_size, config.data.image_size
  images = jax.device_put(
    np.random.RandomState(0).randint(0, 256, (b, s, s, 3)).astype(np.uint8),
    parallel.batch_sharding(mesh),
  )
  mask = jax.device_put(np.ones((b,), bool), parallel.batch_sharding(mesh))

  # The step's FLOPs as XLA counts them with its own convs and conv gradients: the CPU's patch
  # matmuls are loops, whose body XLA's cost analysis counts once.
  xla_config = config.copy_and_resolve_references()
  xla_config.train.conv_impl = 'xla'
  xla_models = stage1.build_models(xla_config)
  plain = stage1.make_train_step(xla_config, xla_models, mesh, shardings, lpips_sh)
  flops = (plain.lower(state, lpips_params, images).compile().cost_analysis() or {}).get(
    'flops', 0.0
  )
  t0 = time.perf_counter()
  compiled = step.lower(state, lpips_params, images).compile()
  holder = {'state': state}
  holder['state'], metrics = compiled(holder['state'], lpips_params, images)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0

  def train_once():
    holder['state'], m = compiled(holder['state'], lpips_params, images)
    jax.block_until_ready(m)

  def eval_once():
    jax.block_until_ready(evaluate(holder['state']['params'], lpips_params, images, mask))

  train_s = _median_time(train_once, iters, warmup)
  eval_s = _median_time(eval_once, iters, 1)
  return {
    'images_per_s': b / train_s,
    'eval_images_per_s': b / eval_s,
    'step_ms': 1e3 * train_s,
    'step_gflop': flops / 1e9,
    'gflops_per_s': flops / 1e9 / train_s,
    'compile_s': compile_s,
  }


def time_original(config, iters, warmup, threads):
  from vqgan_jax.testing import reference  # pylint: disable=g-import-not-at-top

  m = config.model
  ddconfig = dict(
    ch=m.ch,
    ch_mult=list(m.ch_mult),
    num_res_blocks=m.num_res_blocks,
    attn_resolutions=list(m.attn_resolutions),
    resolution=m.resolution,
    z_channels=m.z_channels,
    in_channels=m.in_channels,
    out_ch=m.out_ch,
    dropout=m.dropout,
    double_z=False,
  )
  lossconfig = dict(
    disc_start=0,
    disc_weight=config.loss.disc_weight,
    disc_num_layers=config.loss.disc_num_layers,
    disc_ndf=config.loss.disc_ndf,
    codebook_weight=config.loss.codebook_weight,
    perceptual_weight=config.loss.perceptual_weight,
    disc_loss=config.loss.disc_loss,
  )
  return reference.time_original_stage1(
    ddconfig,
    m.n_embed,
    m.embed_dim,
    lossconfig,
    config.train.batch_size,
    config.data.image_size,
    threads=threads,
    warmup=warmup,
    iters=iters,
  )


def conv_profile(rounds=5):
  """One JSON row per conv shape: ms and GFLOP/s of forward + input and kernel gradients."""
  pad = ((1, 1), (1, 1))

  def fwd_bwd(conv, dtype):
    loss = lambda x, k: jnp.sum(jnp.square(conv(x.astype(dtype), k.astype(dtype))))
    return jax.jit(jax.grad(loss, (0, 1)))

  candidates = {
    'float32_xla': fwd_bwd(lambda x, k: cpu_conv.lax_conv(x, k, 1, pad), jnp.float32),
    'float32': fwd_bwd(lambda x, k: conv.conv2d(x, k, 1, pad), jnp.float32),
    'bf16_conv': fwd_bwd(lambda x, k: conv.mixed_conv(x, k, 1, pad), jnp.bfloat16),
  }
  for b, size, cin, cout in CONV_SHAPES:
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(b, size, size, cin), jnp.float32)
    k = jnp.asarray(0.05 * rng.randn(3, 3, cin, cout), jnp.float32)
    for fn in candidates.values():
      jax.block_until_ready(fn(x, k))
    best = dict.fromkeys(candidates, float('inf'))
    for _ in range(rounds):  # interleaved, best of: robust to other load on a shared machine
      for name, fn in candidates.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, k))
        best[name] = min(best[name], time.perf_counter() - t0)
    flop = 3 * 2 * b * size * size * 9 * cin * cout
    machine.write_row(
      _out('bench_stage1_bf16_cpu.jsonl'),
      {
        'name': 'conv3x3_fwd_bwd',
        'shape': [b, size, size, cin, cout],
        'ms': {n: round(1e3 * t, 2) for n, t in best.items()},
        'gflops_per_s': {n: round(flop / t / 1e9, 1) for n, t in best.items()},
        'load_avg_1m': os.getloadavg()[0],
      },
    )


def _out(default):
  return '' if _OUT.value == '-' else _OUT.value or default


def _reference_available():
  try:
    import taming  # noqa: F401
    import torch  # noqa: F401

    return True
  except ImportError:
    return False


def main(argv):
  del argv
  if _CONV_PROFILE.value:
    conv_profile()
    return
  use_ref = not _NO_REF.value and _reference_available()
  for name in _CONFIGS.value:
    rows = []
    for dtype, impl in [(d, i) for d in _DTYPES.value for i in _CONV_IMPLS.value]:
      config = bench_config(name, dtype, impl)
      row = {
        'name': f'stage1_train_{name}',
        'batch': config.train.batch_size,
        'image_size': config.data.image_size,
        'dtype': dtype,
        'conv_impl': impl,
        'device': jax.devices()[0].device_kind,
        'num_devices': jax.device_count(),
      }
      row.update(time_ours(config, _ITERS.value, _WARMUP.value))
      row['load_avg_1m'] = os.getloadavg()[0]
      rows.append(row)
    if use_ref:
      orig = time_original(config, _ITERS.value, _WARMUP.value, _THREADS.value)
      for row in rows:
        row['original_images_per_s'] = orig
        row['ratio_vs_original'] = row['images_per_s'] / orig
        row['load_avg_1m_original'] = os.getloadavg()[0]
    for row in rows:
      row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
      machine.write_row(_out('bench_stage1_cpu.jsonl'), row)


if __name__ == '__main__':
  app.run(main)
