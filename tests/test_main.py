"""End to end: `python -m vqgan_jax.main` in subprocesses on the demo's smoke config
(`:smoke,demo`: the smoke model's size with the demo's FSQ, fixed GAN weight and EMA weights;
the original's quantizer at smoke size goes through `main` in test_stage2.py's handoff).

All runs share one TFDS data dir (Fashion-MNIST is prepared once) and one persistent JAX
compilation cache, so only the first run pays for compiling. The uninterrupted smoke run
(`smoke_run`) doubles as run A of the resume test and as the checkpoint for the
restore-onto-another-mesh and incompatible-resume tests.
"""

import hashlib
import json
import os
import pickletools
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist_vqgan
from vqgan_jax import checkpoints
from vqgan_jax import parallel
from vqgan_jax.train import stage1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = 'smoke,demo'
CONFIG = f'configs/fashion_mnist_vqgan.py:{SMOKE}'
NUM_STEPS = 8  # the smoke config's
KILL_AFTER_STEP = 4  # the smoke config checkpoints every 4 steps

_TIMES = {}


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('main_shared')
  e = dict(os.environ)
  e.update(
    {
      'TFDS_DATA_DIR': str(root / 'tfds'),
      # jax 0.10 reads its config options from the upper-cased env vars.
      'JAX_COMPILATION_CACHE_DIR': str(root / 'jax_cache'),
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      # -1: no size limit and no filesystem-dependent override (0 means "default").
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1',
      'PYTHONUNBUFFERED': '1',
    }
  )
  return e


def _cmd(workdir, *overrides):
  return [
    sys.executable,
    '-m',
    'vqgan_jax.main',
    f'--config={CONFIG}',
    f'--workdir={workdir}',
    *overrides,
  ]


def _main(env, workdir, *overrides, timeout=600):
  t0 = time.perf_counter()
  proc = subprocess.run(
    _cmd(workdir, *overrides), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )
  return proc, time.perf_counter() - t0


def _explain(proc):
  return (
    f'exit code {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n'
    f'--- stderr\n{proc.stderr[-5000:]}'
  )


@pytest.fixture(scope='module')
def smoke_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('smoke') / 'run'
  proc, elapsed = _main(env, workdir)
  assert proc.returncode == 0, _explain(proc)
  _TIMES['smoke run (prepares data, cold cache)'] = elapsed
  return workdir


def _pickles(directory):
  """Files under `directory` that are Python pickles (by name, or a whole file that parses as
  one): loading a pickle can run code, so a workdir holds none (orbax's msgpack and array
  files, JSON, PNG and event files are data)."""
  found = []
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        head = f.read(2)
        if not name.endswith(('.pkl', '.pickle')):
          if head[:1] != b'\x80' or head[1:2] not in b'\x02\x03\x04\x05':
            continue  # every pickle of protocol 2 and later starts with PROTO
          f.seek(0)
          try:
            list(pickletools.genops(f))
          except Exception:  # pylint: disable=broad-except
            continue  # not a pickle after all
        found.append(os.path.relpath(path, directory))
  return found


def _committed_steps(workdir):
  d = workdir / 'checkpoints'
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def _abstract_state(config):
  models = stage1.build_models(config)
  return jax.eval_shape(lambda r: stage1.init_state(config, models, r), jax.random.PRNGKey(0))


def _restore(workdir, config, shardings=None):
  abstract = checkpoints.abstract_like(_abstract_state(config), shardings)
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    state, _, _ = ckpt.restore(abstract, config=config)
  finally:
    ckpt.close()
  return step, state


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _png_size(path):
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
  assert head[12:16] == b'IHDR'
  return struct.unpack('>II', head[16:24])


@pytest.mark.slow
def test_smoke_run_writes_checkpoint_events_grid_and_metrics(smoke_run):
  workdir = smoke_run
  assert _committed_steps(workdir)[-1] == NUM_STEPS
  step_dir = workdir / 'checkpoints' / str(NUM_STEPS)
  for item in ('state', 'data', 'config'):
    assert (step_dir / item).is_dir(), f'{step_dir} lacks {item}/'
  assert not [p for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name]
  events = list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert events and events[0].stat().st_size > 0
  grids = sorted(workdir.glob('reconstructions_*.png'))
  assert [g.name for g in grids] == [f'reconstructions_{NUM_STEPS:07d}.png']
  w, h = _png_size(grids[0])
  # 8 inputs + 8 reconstructions of 32x32, in a grid, possibly upscaled x2.
  assert 64 <= w <= 2048 and 64 <= h <= 2048, (w, h)
  assert w * h >= 16 * 32 * 32
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(grids[0]) as im:
    im.verify()
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  evals = [l for l in lines if l['split'] == 'eval']
  assert evals and evals[-1]['step'] == NUM_STEPS
  for key in ('psnr', 'ssim', 'lpips', 'codebook_usage'):
    assert np.isfinite(evals[-1][key]), key
  assert 0 < evals[-1]['codebook_usage'] <= 1
  assert evals[-1]['num_images'] == 64
  trains = [l for l in lines if l['split'] == 'train']
  assert [l['step'] for l in trains] == [2, 4, 6, 8]
  assert all(np.isfinite(l['total_loss']) for l in trains)
  # The run is the demo's stage 1 (FSQ, a fixed GAN weight, EMA weights), as saved.
  with checkpoints.Checkpointer(workdir, read_only=True) as ckpt:
    saved = ckpt.restore_config(NUM_STEPS)
  assert saved['model']['quantizer'] == 'fsq' and saved['loss']['adaptive_weight'] is False
  assert saved['train']['params_ema_decay'] == 0.99
  assert _pickles(workdir) == []
  # The smoke config's disc_start is 4 (batches seen before the step, as PL's global_step):
  # the line logged after update 4 is still D-off, from update 5 on D trains.
  assert [l['disc_factor'] for l in trains] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_final_state(smoke_run, env, tmp_path):
  workdir = tmp_path / 'killed'
  t0 = time.perf_counter()
  log = tmp_path / 'killed.log'  # a file, not a pipe nobody reads while we poll
  with open(log, 'w') as out:
    proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 600
    # orbax writes <step>.orbax-checkpoint-tmp-* and renames it to <step> when committed.
    while KILL_AFTER_STEP not in _committed_steps(workdir):
      assert proc.poll() is None, f'run exited early ({proc.returncode}): {log.read_text()[-5000:]}'
      assert time.monotonic() < deadline, 'no checkpoint for step 4 after 600 s'
      time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
  _TIMES['run B until killed (warm cache)'] = time.perf_counter() - t0
  assert proc.returncode == -signal.SIGKILL
  steps = _committed_steps(workdir)
  assert KILL_AFTER_STEP in steps and NUM_STEPS not in steps, (
    f'killed too late to test a resume: committed steps {steps}'
  )

  proc, elapsed = _main(env, workdir)
  assert proc.returncode == 0, _explain(proc)
  _TIMES['run B resumed to the end (warm cache)'] = elapsed
  assert _committed_steps(workdir)[-1] == NUM_STEPS

  config = fashion_mnist_vqgan.get_config(SMOKE)
  step_a, state_a = _restore(smoke_run, config)
  step_b, state_b = _restore(workdir, config)
  assert step_a == step_b == NUM_STEPS
  state_a, state_b = _host(state_a), _host(state_b)
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  assert int(state_b['step']) == NUM_STEPS
  for (path, a), (_, b) in zip(
    jax.tree_util.tree_flatten_with_path(state_a)[0],
    jax.tree_util.tree_flatten_with_path(state_b)[0],
  ):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # The EMA of the weights trained beside them and resumed with them.
  ema, raw = jax.tree.leaves(state_b['params_ema']), jax.tree.leaves(state_b['params'])
  assert len(ema) == len(raw) and not all(np.array_equal(a, b) for a, b in zip(ema, raw))
  # Both really trained 8 steps (Adam counts the AE and D updates).
  assert int(state_b['opt_state'][0].count) == int(state_b['disc_opt_state'][0].count) == 8
  # Restarting reran the training from step 5; metrics.jsonl holds each logged step once
  # (rows the killed run wrote after its checkpoint are replaced, not repeated).
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if l['split'] == 'train'] == [2, 4, 6, 8]
  assert [l['step'] for l in lines if l['split'] == 'eval'] == [8]
  cache = env['JAX_COMPILATION_CACHE_DIR']
  entries = os.listdir(cache) if os.path.isdir(cache) else []
  _TIMES['compilation cache entries'] = len(entries)
  assert entries, f'the persistent compilation cache {cache} stayed empty'
  print(
    '\n'
    + '\n'.join(f'{k}: {v:.1f}' if isinstance(v, float) else f'{k}: {v}' for k, v in _TIMES.items())
  )


@pytest.mark.slow
def test_checkpoint_restores_onto_an_8_device_mesh(smoke_run):
  config = fashion_mnist_vqgan.get_config(SMOKE)
  step, saved = _restore(smoke_run, config)  # one device, as written
  assert step == NUM_STEPS
  config.mesh.update(data=2, fsdp=4)
  mesh = parallel.make_mesh(config.mesh)
  assert mesh.size == 8
  shardings = parallel.state_shardings(_abstract_state(config), mesh)
  _, state = _restore(smoke_run, config, shardings)
  n_sharded = 0
  for (path, x), (_, s), (_, y) in zip(
    jax.tree_util.tree_flatten_with_path(state)[0],
    jax.tree.leaves_with_path(shardings),
    jax.tree_util.tree_flatten_with_path(_host(saved))[0],
  ):
    name = jax.tree_util.keystr(path)
    assert x.sharding == s, name
    np.testing.assert_array_equal(np.asarray(x), y, err_msg=name)
    if 'fsdp' in tuple(x.sharding.spec):
      n_sharded += 1
      assert x.addressable_shards[0].data.size == x.size // 4, name
  assert n_sharded >= 10
  # The restored state trains on: the params handoff reads the same values too.
  params = checkpoints.restore_params(
    smoke_run, checkpoints.abstract_like(_abstract_state(config)['params'], shardings['params'])
  )
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(env, tmp_path):
  """Each bad input is refused before step 1 with one `error:` line naming what to fix."""
  folder = tmp_path / 'images' / 'only_class'
  folder.mkdir(parents=True)
  for i in range(4):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f'{i}.png')
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a directory')
  cases = [
    ((), '--config.model.ch=48', 'config.model.ch'),
    ((), '--config.train.nonexistent=1', '--config.train.nonexistent'),
    ((), f'--config.init_from={tmp_path / "missing"}', 'config.init_from'),
    # The eval split is checked before training, not at the first eval.
    (
      (f'--config.data.folder={tmp_path / "images"}', '--config.data.eval_split=test'),
      '--config.data.name=folder',
      'config.data.eval_split',
    ),
  ]
  for extra, override, named in cases:
    proc, _ = _main(env, tmp_path / 'bad', override, *extra)
    assert proc.returncode == 2, _explain(proc)
    assert 'Traceback' not in proc.stderr, _explain(proc)
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
    assert len(errors) == 1 and named in errors[0], _explain(proc)
  # A workdir that cannot be written (here: a file) is one sentence too.
  proc, _ = _main(env, a_file)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, _explain(proc)
  assert [l for l in proc.stderr.splitlines() if l.startswith('error: --workdir')], _explain(proc)


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(smoke_run, env, tmp_path):
  """A loss that turns non-finite stops the run with one sentence naming the step and the
  last good checkpoint; no non-finite state is saved, so a rerun resumes from good params."""
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run, workdir)
  proc, _ = _main(env, workdir, '--config.optim.base_lr=1e6', '--config.train.num_steps=12')
  assert proc.returncode == 2, _explain(proc)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'diverged' in errors[0] and 'step 8' in errors[0], _explain(proc)
  assert 'Traceback' not in proc.stderr, _explain(proc)
  assert _committed_steps(workdir) == [4, NUM_STEPS]
  _, state = _restore(workdir, fashion_mnist_vqgan.get_config(SMOKE))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['params']))
  # metrics.jsonl stays strict JSON: the diverged row holds null, not a NaN literal.
  rows = [
    json.loads(l, parse_constant=lambda c: pytest.fail(f'{c} in metrics.jsonl'))
    for l in (workdir / 'metrics.jsonl').read_text().splitlines()
  ]
  assert rows[-1]['split'] == 'train' and rows[-1]['total_loss'] is None


@pytest.mark.slow
def test_full_disk_at_a_save_keeps_the_committed_checkpoints(smoke_run, env, tmp_path):
  """A save that cannot be written stops the run with one `error:` line naming the step and
  saying the committed steps stay; they do, and still restore."""
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run, workdir)
  # A real limit (a full disk reads the same): files past 256 KiB fail with EFBIG, not
  # SIGXFSZ (Python ignores that signal). The checkpoint's array file is larger. Set by the
  # shell (`ulimit`), not a preexec_fn: forking this multithreaded process runs no Python.
  # One step past the copied run's last checkpoint: the final save (step 9) fails.
  cmd = _cmd(workdir, '--config.train.num_steps=9', '--config.train.eval_every=100')
  proc = subprocess.run(
    ['bash', '-c', 'ulimit -f 256 && exec "$@"', 'bash', *cmd],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 2, _explain(proc)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1, _explain(proc)
  assert errors[0].startswith('error: Could not write checkpoint step 9 '), _explain(proc)
  assert 'File too large' in errors[0] and 'committed before it stay' in errors[0]
  assert _committed_steps(workdir) == [4, NUM_STEPS]
  assert not [p for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name]
  step, _ = _restore(workdir, fashion_mnist_vqgan.get_config(SMOKE))
  assert step == NUM_STEPS
  # Nor the tracebacks of orbax's abandoned writes (asyncio's "Future exception was never
  # retrieved", 2 runs in 3 before orbax_workarounds.save_failed).
  assert 'Traceback' not in proc.stderr and 'never retrieved' not in proc.stderr, _explain(proc)


def _tree_digest(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, directory)] = (st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
  return out


@pytest.mark.slow
def test_incompatible_resume_is_refused_and_leaves_the_checkpoint(smoke_run, env, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run, workdir)
  before = _tree_digest(workdir / 'checkpoints')
  proc, _ = _main(env, workdir, '--config.model.z_channels=16')
  assert proc.returncode != 0, _explain(proc)
  assert 'model.z_channels' in proc.stderr, _explain(proc)
  assert 'Traceback' not in proc.stderr, _explain(proc)
  assert _tree_digest(workdir / 'checkpoints') == before


@pytest.mark.slow
def test_bad_mesh_exits_2_with_one_line(env, tmp_path):
  proc, _ = _main(env, tmp_path / 'bad_mesh', '--config.mesh.data=3')
  assert proc.returncode == 2, _explain(proc)
  assert 'Traceback' not in proc.stderr, _explain(proc)
  assert [l for l in proc.stderr.splitlines() if 'config.mesh' in l], _explain(proc)
