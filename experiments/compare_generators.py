"""Sampling latency of the two stage-2 generators: the KV-cached AR GPT vs MaskGIT.

  python experiments/compare_generators.py [--batches=1,8,64] [--steps=4,8,12,16] [--iters=3]

The issue's workload: 8 layers x 512 wide (8 heads) over a 16x16 grid of 512 codes after one
class token, random weights (latency does not depend on training), temperature 1, top-k 100
for both. The GPT decodes the 256 codes one per step (`sampling.sample`: preallocated K/V
cache, one jitted loop); MaskGIT in T parallel steps (`maskgit_sampling.sample`, T forwards
of all 257 positions). Prints one JSON object per line: `kind` ('gpt' or 'maskgit'), `batch`,
`steps` (T; 256 for the GPT), `latency_s` (seconds to return one batch of samples after
compile: the median of up to --iters timed calls), `samples_per_s` and `codes_per_s`
(throughput), `compile_s` (each sampler is compiled ahead of time, as one jitted function of
(params, condition, key), so no untimed sampling run is needed), and for MaskGIT
`speedup_vs_gpt` (the GPT's latency at that batch / this one). The machines here are shared:
at each batch size the samplers are timed in turn (GPT, T=4, T=8, ..., GPT, T=4, ...) so
that they see the same load, and the rounds stop after --max_batch_s (at least one).

Sample quality (Frechet distance, class accuracy) of the two trained demos is not measured
here: it needs the `--mode=eval` evaluators and trained workdirs.
"""

import os
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import machine
import numpy as np

from vqgan_jax import config_base
from vqgan_jax import maskgit_sampling
from vqgan_jax import sampling
from vqgan_jax.train import stage2
from vqgan_jax.train import stage2_config

_BATCHES = flags.DEFINE_list('batches', ['1', '8', '64'], 'Batch sizes.')
_STEPS = flags.DEFINE_list('steps', ['4', '8', '12', '16'], 'MaskGIT decoding steps T.')
_ITERS = flags.DEFINE_integer('iters', 3, 'Timed rounds per batch size after compiling.')
_MAX_BATCH_S = flags.DEFINE_float(
  'max_batch_s', 300.0, 'No further timed round once a batch size has spent this long.'
)
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_KINDS = flags.DEFINE_list('kinds', ['gpt', 'maskgit'], 'Which generators.')
_OUT = flags.DEFINE_string(
  'out',
  'compare_generators.jsonl',
  'Results file under experiments/results/ (or a path) the rows are appended to, with where they '
  'ran (machine.write_row); empty: print only.',
)

N_CODES, GRID, N_LAYER, N_HEAD, N_EMBD, N_CLASSES = 512, 16, 8, 8, 512, 10
TOP_K, TEMPERATURE = 100, 1.0


def model_for(kind, dtype):
  c = config_base.stage2_base()
  c.stage1_config.update(n_embed=N_CODES, ch_mult=(1, 1, 2, 2, 4))  # f16: 256 px -> 16x16
  c.data.image_size = GRID * 16
  c.cond.update(kind='class', n_classes=N_CLASSES)
  c.transformer.update(kind=kind, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD)
  c.train.dtype = dtype
  c = stage2_config.resolve_config(c)
  layout = stage2_config.make_layout(c)
  model = stage2_config.build_model(c, layout, scan_layers=False)
  params = jax.jit(lambda r: stage2.init_params(model, r))(jax.random.PRNGKey(0))
  return layout, model, params


def sampler(kind, model, params, cond, steps):
  """(a callable returning one batch of codes, its compile seconds)."""
  lib = sampling if kind == 'gpt' else maskgit_sampling
  # The GPT's steps are its tokens; MaskGIT's its decoding iterations.
  length = dict(steps=steps) if kind == 'gpt' else dict(iterations=steps)
  fn = jax.jit(
    lambda p, c, k: lib.sample(p, model, c, k, **length, temperature=TEMPERATURE, top_k=TOP_K)
  )
  key = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  compiled = fn.lower(params, cond, key).compile()
  return lambda: compiled(params, cond, key), time.perf_counter() - t0


def _seconds(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def time_round_robin(fns):
  """[(median seconds, timed calls)] of each callable, timed in turn (A, B, C, A, B, C, ...)
  so that all see the same machine load."""
  times, spent = [[] for _ in fns], 0.0
  while len(times[0]) < max(1, _ITERS.value) and (not times[0] or spent < _MAX_BATCH_S.value):
    for fn, ts in zip(fns, times):
      ts.append(_seconds(fn))
      spent += ts[-1]
  return [(statistics.median(ts), len(ts)) for ts in times]


def main(argv):
  del argv
  models = {k: model_for(k, _DTYPE.value) for k in _KINDS.value}
  base = {
    'n_layer': N_LAYER,
    'n_head': N_HEAD,
    'n_embd': N_EMBD,
    'codes': GRID * GRID,
    'n_codes': N_CODES,
    'top_k': TOP_K,
    'temperature': TEMPERATURE,
    'dtype': _DTYPE.value,
    'device': jax.devices()[0].platform,
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
  }
  for batch in (int(b) for b in _BATCHES.value):
    rows = []  # (kind, layout, steps, sampler, compile seconds)
    for kind in _KINDS.value:
      layout, model, params = models[kind]
      cond = jax.numpy.asarray(stage2.class_tokens(layout, np.arange(batch) % N_CLASSES))
      for steps in [layout.image_len] if kind == 'gpt' else [int(t) for t in _STEPS.value]:
        rows.append((kind, layout, steps, *sampler(kind, model, params, cond, steps)))
    timings = time_round_robin([row[3] for row in rows])
    load = round(os.getloadavg()[0], 2)
    gpt_latency = None
    for (kind, layout, steps, _, compile_s), (latency, n) in zip(rows, timings):
      row = dict(
        kind=kind,
        batch=batch,
        steps=steps,
        latency_s=round(latency, 4),
        samples_per_s=round(batch / latency, 3),
        codes_per_s=round(batch * layout.image_len / latency, 1),
        compile_s=round(compile_s, 2),
        timed_calls=n,
        **base,
        load_avg_1m=load,
      )
      if kind == 'gpt':
        gpt_latency = latency
      elif gpt_latency is not None:
        row['speedup_vs_gpt'] = round(gpt_latency / latency, 3)
      machine.write_row(_OUT.value, row)


if __name__ == '__main__':
  app.run(main)
