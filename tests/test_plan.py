"""The memory planner's stage-2 path on a tiny GPT (8 fake CPU devices, in process)."""

import json
import os
import subprocess
import sys

import pytest

from configs import fashion_mnist_transformer
from vqgan_jax import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = {'data': 2, 'fsdp': 2, 'tensor': 2}


def _config(**transformer):
  """A tiny class-conditional GPT over 8x8 codes of 32 (no stage-1 checkpoint needed)."""
  c = fashion_mnist_transformer.get_config('smoke')
  c.stage1_workdir = ''
  c.stage1_config.update(ch_mult=(1, 2, 2, 2), n_embed=32)  # f8: 64 -> 8x8
  c.data.image_size = 64
  c.cond.update(kind='class', n_classes=8)  # vocab 40: divisible by tensor=2
  c.transformer.update(n_layer=2, n_head=2, n_embd=64, **transformer)
  c.train.update(batch_size=8, eval_batch_size=8, dtype='float32')
  return c


def test_stage2_plan_shows_state_remat_and_dtype():
  """State bytes per device from the logical-axis shardings; remat and the compute dtype are
  in the output, and rematerialising the scanned blocks lowers the step's temp memory."""
  base = plan.plan(_config(remat='none'), MESH, 1.0, search_batch=False)
  assert base['config_stage'] == 'transformer' and base['num_devices'] == 8
  assert base['mesh'] == MESH and base['global_batch'] == 8
  st = base['settings']
  assert (
    st['compute_dtype'],
    st['param_dtype'],
    st['remat'],
    st['remat_policy'],
    st['scan_layers'],
  ) == ('float32', 'float32', 'none', None, True)
  assert st['model']['vocab_size'] == 40 and st['model']['seq_len'] == 64
  n = base['num_params']
  assert n == 2 * (12 * 64 * 64 + 13 * 64) + 40 * 64 + 64 * 64 + 2 * 64 + 64 * 40
  state = base['state_bytes_per_device']
  # Nearly every parameter is split 4 ways (embed over fsdp, heads/mlp/vocab over tensor);
  # LayerNorms and biases only 2 ways.
  assert 4 * n / 4 < state['params'] < 4 * n / 3
  # AdamW's two moments shard like the params, plus its step counters.
  assert state['opt_state'] - 2 * state['params'] in range(0, 64)
  assert base['peak_bytes'] == (
    base['argument_bytes'] + base['output_bytes'] - base['alias_bytes'] + base['temp_bytes']
  )
  assert base['fits']

  low = plan.plan(
    _config(remat='block', remat_policy='nothing_saveable'), MESH, 1.0, search_batch=False
  )
  assert (low['settings']['remat'], low['settings']['remat_policy']) == (
    'block',
    'nothing_saveable',
  )
  assert low['state_bytes_per_device'] == state
  assert low['temp_bytes'] < 0.8 * base['temp_bytes'], (low['temp_bytes'], base['temp_bytes'])
  print(f'\ntiny GPT temp bytes: remat none {base["temp_bytes"]}, block {low["temp_bytes"]}')


def test_stage2_plan_finds_the_largest_batch():
  config = _config(remat='block')
  config.train.dtype = 'bfloat16'
  budget = 4e-3 * 2**30
  report = plan.plan(config, MESH, budget / 2**30, search_batch=True)
  assert (report['settings']['compute_dtype'], report['settings']['param_dtype']) == (
    'bfloat16',
    'float32',
  )  # bf16 compute, f32 master weights
  best = report['max_global_batch']
  assert best > report['global_batch'] and best % 4 == 0  # data x fsdp
  points = {int(b): p for b, p in report['search_points'].items()}
  assert points[best] == report['max_global_batch_peak_bytes'] <= budget
  assert points[best + 4] > budget  # compiled: the next size up does not fit
  assert 'largest global batch' in plan.summary(report)


def test_largest_batch_search_brackets_a_non_affine_peak():
  """Secant + bisection finds the exact answer on a peak that is not affine in the batch."""
  peak = lambda b: 1000 + 3 * b + (b > 400) * 2 * (b - 400)  # steeper past 400
  for budget in (2000, 2345, 5000, 1003, 1000):
    points = {8: peak(8), 16: peak(16)}
    calls = []
    best = plan.largest_batch(lambda b: calls.append(b) or peak(b), points, budget, 4)
    want = max((b for b in range(0, 4000, 4) if peak(b) <= budget and b), default=0)
    assert best == want, (budget, best, want, calls)
    assert len(calls) <= 8
  # Flat over the first sizes (as XLA's peak can be), then affine: the secant through the
  # flat start points far beyond the answer; the search must still land on it.
  peak = lambda b: 6e9 + 6e5 * max(0, b - 4000)
  points = {64: peak(64), 128: peak(128) + 1000}
  calls = []
  best = plan.largest_batch(lambda b: calls.append(b) or peak(b), points, 80e9, 64)
  assert best == 127296 and peak(best) <= 80e9 < peak(best + 64), (best, calls)
  assert len(calls) <= 12, calls


def test_unknown_stage_is_refused():
  config = _config()
  config.stage = 'diffusion'
  with pytest.raises(Exception, match='the planner knows'):
    plan.plan(config, MESH, 1.0, search_batch=False)


def test_demo_gpt_step_needs_no_full_rematerialization():
  """The CLI on the demo GPT with data, fsdp and tensor axes: SPMD builds no layout by first
  replicating a whole array (XLA then warns "involuntary full rematerialization"; the token
  embedding's backward once did). A subprocess: XLA's warnings reach stderr only once absl's
  app has set up logging."""
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'vqgan_jax.plan',
      '--config=configs/fashion_mnist_transformer.py',
      '--config.stage1_workdir=',
      '--mesh=data=2,fsdp=2,tensor=2',
      '--nosearch_batch',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1])['num_devices'] == 8
  assert 'involuntary full rematerialization' not in proc.stderr.lower(), proc.stderr[-3000:]
