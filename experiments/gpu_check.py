"""The accelerator check: one command, about 5 minutes on one H100 (at most 8), four JSON rows.

  python experiments/gpu_check.py            # on the first GPU: rows in results/gpu_check.jsonl
  python experiments/gpu_check.py --tiny     # every shape shrunk: seconds on a CPU (the test)

Rows (`name`), each with the device kind and where it ran (`machine.write_row`):

* gpu_stage1_train: the f16 ImageNet VQGAN (configs/imagenet_vqgan_f16_16384.py: 16384 codes,
  GAN and LPIPS on) fused train step at 256x256 in bf16: `images_per_s`, `step_tflop` and `mfu`.
* gpu_gpt_train: a stage-2 GPT of ~335M parameters (configs/imagenet_cin_transformer.py at 24
  layers x 1024 wide, 16 heads; 1 class token + 16x16 codes of 16384, offset vocabulary) train
  step in bf16: `tokens_per_s`, `mfu`.
* gpu_gpt_sample: the same GPT's KV-cached sampler (`sampling.sample`, top-k 100), 256 codes per
  sample: `tokens_per_s` and `latency_s` at each of --sample_batches (1 and 64).
* gpu_maskgit_sample: a MaskGIT of the same size and codes (`maskgit_sampling.sample`) at T = 8:
  `latency_s` at each batch, and `speedup_vs_gpt` (the GPT's latency / MaskGIT's).

FLOPs are XLA's count of the compiled step (`compiled.cost_analysis()`, what the device runs,
rematerialisation included); MFU = FLOPs / step time / the chip's dense bf16 peak
(`PEAK_BF16_FLOPS`, by `device_kind`; an unknown device gets no `mfu`). Weights are random:
speed does not depend on them (LPIPS's pretrained VGG is used where its file is installed,
random weights of its shape otherwise). Times are medians of --iters calls after compiling.
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
from vqgan_jax import maskgit_sampling
from vqgan_jax import parallel
from vqgan_jax import sampling
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.train import stage1
from vqgan_jax.train import stage2
from vqgan_jax.train import stage2_config

_TINY = flags.DEFINE_bool('tiny', False, 'Shrink every shape: a CPU run in seconds (the test).')
_ONLY = flags.DEFINE_list(
  'only', ['stage1', 'gpt_train', 'sample'], 'Which parts (sample: the GPT and MaskGIT samplers).'
)
_ITERS = flags.DEFINE_integer('iters', 10, 'Timed train steps (median); samplers: a third.')
_STAGE1_BATCH = flags.DEFINE_integer('stage1_batch', 16, 'VQGAN images per step.')
_GPT_BATCH = flags.DEFINE_integer('gpt_batch', 64, 'GPT sequences per train step.')
_SAMPLE_BATCHES = flags.DEFINE_list('sample_batches', ['1', '64'], 'Sampler batch sizes.')
_OUT = flags.DEFINE_string(
  'out',
  'gpu_check.jsonl',
  "Results file under experiments/results/ (or a path) for the rows; '-': print only.",
)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
# Dense bf16 FLOP/s per chip (datasheets, no sparsity), by a substring of `device_kind`; the
# first match wins ('NVIDIA H100 80GB HBM3' is the SXM part, 'NVIDIA H100 PCIe' the PCIe one).
PEAK_BF16_FLOPS = (
  ('H100 PCIe', 756e12),
  ('H100', 989e12),
  ('H200', 989e12),
  ('A100', 312e12),
)
MASKGIT_T, TOP_K = 8, 100


def peak_flops(device_kind: str):
  """The chip's dense bf16 peak, or None for a device not in the table."""
  return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_kind), None)


def step_flops(compiled) -> float:
  """XLA's FLOP count of a compiled program (a dict, or a list of one per program)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def _median_s(fn, iters):
  times = []
  for _ in range(max(1, iters)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _utilisation(flops, seconds):
  peak = peak_flops(jax.devices()[0].device_kind)
  out = {'tflops_per_s': flops / seconds / 1e12}
  if peak and flops:
    out['mfu'] = flops / seconds / peak
  return out


# ----------------------------------------------------------------------------------------
# Configs: the project's, shrunk by --tiny
# ----------------------------------------------------------------------------------------


def stage1_config(tiny):
  path = os.path.join(CONFIGS, 'imagenet_vqgan_f16_16384.py')
  c = config_base.load_sibling(path, 'imagenet_vqgan_f16_16384').get_config()
  c.train.update(dtype='bfloat16', batch_size=_STAGE1_BATCH.value)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  if tiny:
    c.model.update(
      ch=32,
      ch_mult=(1, 2),
      num_res_blocks=1,
      attn_resolutions=(),
      resolution=16,
      z_channels=8,
      n_embed=32,
      embed_dim=8,
    )
    c.data.image_size = 16
    c.loss.update(disc_ndf=8, disc_num_layers=1)
    c.train.update(batch_size=2, conv_impl='xla')  # XLA's convs: the FLOP count covers them
  return c


def stage2_cfg(kind, tiny, batch=1):
  """A GPT (or MaskGIT) of ~335M parameters over the f16 VQGAN's 16x16 codes of 16384, after
  one class token: configs/imagenet_cin_transformer.py at 24 x 1024 (16 heads)."""
  path = os.path.join(CONFIGS, 'imagenet_cin_transformer.py')
  c = config_base.load_sibling(path, 'imagenet_cin_transformer').get_config()
  c.transformer.update(kind=kind, n_layer=24, n_head=16, n_embd=1024, shared_vocab=False)
  c.train.update(batch_size=batch, dtype='bfloat16')
  c.mesh.update(data=1, fsdp=1, tensor=1)
  if tiny:
    c.stage1_config.update(n_embed=32)
    c.data.image_size = 64  # 4x4 codes
    c.cond.n_classes = 10
    c.transformer.update(n_layer=1, n_head=2, n_embd=32)
  c = stage2_config.resolve_config(c)
  return c, stage2_config.make_layout(c)


# ----------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------


def _lpips_params():
  try:
    return lpips_lib.load_pretrained_params(), True
  except lpips_lib.LPIPSWeightsError:  # not installed there: its shapes suffice for speed
    x = jnp.zeros((1, 16, 16, 3))
    return jax.jit(lpips_lib.LPIPS().init)(jax.random.PRNGKey(0), x, x)['params'], False


def check_stage1(tiny):
  config = stage1_config(tiny)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  models = stage1.build_models(config)
  state, shardings = stage1.create_sharded_state(config, models, mesh, jax.random.PRNGKey(0))
  lpips_params, pretrained = _lpips_params()
  lpips_sh = jax.tree.map(lambda _: parallel.replicated(mesh), lpips_params)
  lpips_params = jax.device_put(lpips_params, lpips_sh)
  b, s = config.train.batch_size, config.data.image_size
  images = jax.device_put(
    np.random.RandomState(0).randint(0, 256, (b, s, s, 3)).astype(np.uint8),
    parallel.batch_sharding(mesh),
  )
  t0 = time.perf_counter()
  step = stage1.make_train_step(config, models, mesh, shardings, lpips_sh)
  compiled = step.lower(state, lpips_params, images).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def once():
    holder['state'], metrics = compiled(holder['state'], lpips_params, images)
    return metrics

  jax.block_until_ready(once())  # warm-up
  seconds = _median_s(once, _ITERS.value)
  flops = step_flops(compiled)
  m = config.model
  return {
    'name': 'gpu_stage1_train',
    'config': 'imagenet_vqgan_f16_16384',
    'dtype': config.train.dtype,
    'batch': b,
    'image_size': s,
    'model': {'ch': m.ch, 'ch_mult': list(m.ch_mult), 'n_embed': m.n_embed},
    'lpips_pretrained': pretrained,
    'images_per_s': b / seconds,
    'step_ms': 1e3 * seconds,
    'step_tflop': flops / 1e12,
    **_utilisation(flops, seconds),
    'compile_s': compile_s,
  }


def _gpt_fields(config, layout, n_params):
  t = config.transformer
  return {
    'n_layer': t.n_layer,
    'n_head': t.n_head,
    'n_embd': t.n_embd,
    'vocab': layout.vocab_size,
    'block_size': layout.block_size,
    'params_m': n_params / 1e6,
    'dtype': config.train.dtype,
  }


def check_gpt_train(tiny):
  batch = 4 if tiny else _GPT_BATCH.value
  config, layout = stage2_cfg('gpt', tiny, batch)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  model = stage2_config.build_model(config, layout)
  state, step = stage2.fresh_train(config, model, layout, mesh)
  rng = np.random.RandomState(0)
  inputs = {
    'codes': jnp.asarray(rng.randint(0, layout.n_image, (batch, layout.image_len)), jnp.int32),
    'label': jnp.asarray(rng.randint(0, config.cond.n_classes, (batch,)), jnp.int32),
  }
  t0 = time.perf_counter()
  compiled = step.lower(state, {}, inputs).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def once():
    holder['state'], metrics = compiled(holder['state'], {}, inputs)
    return metrics

  jax.block_until_ready(once())
  seconds = _median_s(once, _ITERS.value)
  flops = step_flops(compiled)
  n_params = sum(x.size for x in jax.tree.leaves(holder['state']['params']))
  tokens = batch * layout.seq_len
  return {
    'name': 'gpu_gpt_train',
    **_gpt_fields(config, layout, n_params),
    'batch': batch,
    'seq_len': layout.seq_len,
    'tokens_per_s': tokens / seconds,
    'step_ms': 1e3 * seconds,
    'step_tflop': flops / 1e12,
    **_utilisation(flops, seconds),
    'compile_s': compile_s,
  }


def _sampler(kind, model, layout, params, cond):
  """(a call returning one batch of codes, the seconds of the first call: compile and one run).
  The samplers jit themselves (after checking their arguments and memory on the host)."""
  key = jax.random.PRNGKey(0)
  if kind == 'gpt':
    run = lambda: sampling.sample(params, model, cond, key, steps=layout.image_len, top_k=TOP_K)
  else:
    run = lambda: maskgit_sampling.sample(
      params, model, cond, key, iterations=MASKGIT_T, top_k=TOP_K
    )
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  return run, time.perf_counter() - t0


def check_samplers(tiny):
  """One row per generator: latency (and the GPT's tokens/s) at each batch size."""
  rows, gpt_latency = [], {}
  for kind in ('gpt', 'maskgit'):
    config, layout = stage2_cfg(kind, tiny)
    model = stage2_config.build_model(config, layout, scan_layers=False)
    params = jax.jit(lambda r, m=model: stage2.init_params(m, r))(jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    row = {
      'name': f'gpu_{kind}_sample',
      **_gpt_fields(config, layout, n_params),
      'codes': layout.image_len,
      'top_k': TOP_K,
    }
    if kind == 'maskgit':
      row['iterations'] = MASKGIT_T
    for batch in (int(b) for b in _SAMPLE_BATCHES.value):
      cond = jnp.asarray(stage2.class_tokens(layout, np.arange(batch) % config.cond.n_classes))
      run, compile_s = _sampler(kind, model, layout, params, cond)
      latency = _median_s(run, max(1, _ITERS.value // 3))
      at = {'latency_s': latency, 'first_call_s': compile_s}
      if kind == 'gpt':
        gpt_latency[batch] = latency
        at['tokens_per_s'] = batch * layout.image_len / latency
      elif batch in gpt_latency:
        at['speedup_vs_gpt'] = gpt_latency[batch] / latency
      row[f'batch_{batch}'] = at
    rows.append(row)
  return rows


def _rounded(value):
  if isinstance(value, float):
    return float(f'{value:.4g}')
  if isinstance(value, dict):
    return {k: _rounded(v) for k, v in value.items()}
  return value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tiny = _TINY.value
  device = jax.devices()[0]
  where = {
    'device_kind': device.device_kind,
    'platform': device.platform,
    'num_devices': jax.device_count(),
    'peak_bf16_tflops': (peak_flops(device.device_kind) or 0) / 1e12 or None,
    'tiny': tiny,
  }
  out = '' if _OUT.value == '-' else _OUT.value
  checks = {
    'stage1': lambda: [check_stage1(tiny)],
    'gpt_train': lambda: [check_gpt_train(tiny)],
    'sample': lambda: check_samplers(tiny),
  }
  unknown = sorted(set(_ONLY.value) - set(checks))
  if unknown:
    raise app.UsageError(f'--only: unknown parts {unknown}; known: {sorted(checks)}')
  t_start = time.perf_counter()
  for part in _ONLY.value:
    for row in checks[part]():
      row['elapsed_s'] = time.perf_counter() - t_start
      machine.write_row(out, _rounded({**row, **where}))


if __name__ == '__main__':
  app.run(main)
