"""Checkpointer: round trips, retention, resharding, handoff, config checks, crashes, unreadable
steps, non-finite states, exit noise."""

import logging
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.sharding import SingleDeviceSharding
import ml_collections
import numpy as np
import optax
import pytest

from vqgan_jax import checkpoints as ckpt_lib
from vqgan_jax import fingerprint
from vqgan_jax import orbax_workarounds
from vqgan_jax import run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**model):
  c = ml_collections.ConfigDict()
  c.stage = 'vqgan'
  c.model = ml_collections.ConfigDict(dict(ch=64, ch_mult=(1, 2), n_embed=16))
  c.model.update(model)
  c.loss = ml_collections.ConfigDict(dict(disc_num_layers=2, disc_ndf=16, disc_weight=0.8))
  c.train = ml_collections.ConfigDict(dict(num_steps=100, log_every=10))
  return c


def _mesh(shape, names):
  return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])


def _state(seed=0, mesh=None):
  k = jax.random.split(jax.random.key(seed), 3)
  params = {
    'enc': {'conv': {'kernel': jax.random.normal(k[0], (3, 3, 4, 16)), 'bias': jnp.zeros((16,))}},
    'codebook': jax.random.normal(k[1], (16, 8)),
  }
  if mesh is not None:
    params = jax.device_put(
      params,
      {
        'enc': {
          'conv': {
            'kernel': NamedSharding(mesh, P(None, None, None, 'fsdp')),
            'bias': NamedSharding(mesh, P('fsdp')),
          }
        },
        'codebook': NamedSharding(mesh, P('fsdp')),
      },
    )
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  # One update so the moments are not all zeros.
  grads = jax.tree.map(lambda p: 0.1 * p + 1.0, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {
    'step': jnp.asarray(7, jnp.int32),
    'params': params,
    'opt_state': opt_state,
    'disc_params': {'w': jax.random.normal(k[2], (4, 4))},
    'batch_stats': {'mean': jnp.arange(4.0)},
    'rng': jax.random.key(seed + 1),  # typed key
    'raw_rng': jax.random.PRNGKey(seed + 2),
  }  # raw uint32 key data


def _host(tree):
  """Host copies; typed keys as ('key', impl, key data)."""

  def f(x):
    if not hasattr(x, 'dtype'):
      return x
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return ('key', str(x.dtype), np.asarray(jax.random.key_data(x)))
    return np.asarray(x)

  return jax.tree.map(f, tree)


def _assert_bit_equal(a, b):
  a, b = _host(a), _host(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if isinstance(x, np.ndarray):
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(x, y)
    else:
      assert x == y


def test_round_trip_bit_equal(tmp_path):
  state = _state()
  expected = _host(state)
  data_state = b'{"last_seen_indices": {"0": 41}, "worker_count": 0}'
  ck = ckpt_lib.Checkpointer(tmp_path, save_every=1)
  assert ck.latest_step() is None
  assert ck.save(7, state, data_state, _config())
  # save() returned after the device-to-host copy: the state may be donated.
  for x in jax.tree.leaves(state):
    x.delete()
  ck.wait()
  assert ck.latest_step() == 7

  target = ckpt_lib.abstract_like(_state())
  restored, data, saved_config = ck.restore(target, config=_config())
  ck.close()
  _assert_bit_equal(restored, expected)
  # optax states come back as their namedtuples, keys as typed keys.
  assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
  assert isinstance(restored['opt_state'][1], optax.EmptyState)
  assert jnp.issubdtype(restored['rng'].dtype, jax.dtypes.prng_key)
  assert restored['raw_rng'].dtype == jnp.uint32
  assert data == data_state and isinstance(data, bytes)
  assert saved_config['model']['ch_mult'] == [1, 2]
  # The config comes back as saved, upgraded to the schema of today (fields it predates filled).
  assert saved_config == run_config.upgrade_config(run_config.config_to_dict(_config()))


def test_resume_restores_the_latest_step_and_the_iterator(tmp_path):
  class Iterator:
    state = None

    def set_state(self, state):
      self.state = state

  target = {'x': jax.ShapeDtypeStruct((4,), jnp.float32)}
  it = Iterator()
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    assert ck.resume(target, it, config=_config()) is None  # a fresh run
    assert it.state is None
    ck.save(3, {'x': jnp.full(4, 3.0)}, b'at 3', _config())
    ck.save(5, {'x': jnp.full(4, 5.0)}, b'at 5', _config())
    ck.wait()
    state = ck.resume(target, it, config=_config())
    np.testing.assert_array_equal(state['x'], np.full(4, 5.0))
    assert it.state == b'at 5'
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match='model.ch: checkpoint 64'):
      ck.resume(target, it, config=_config(ch=128))


def test_relative_workdir(tmp_path, monkeypatch):
  # orbax's OCDBT writer refuses relative paths, and only when an async save commits.
  monkeypatch.chdir(tmp_path)
  with ckpt_lib.Checkpointer('runs/relative', save_every=1) as ck:
    ck.save(3, {'x': jnp.arange(4.0)}, None, {'stage': 'vqgan'})
    ck.wait()
    assert ck.latest_step() == 3
  assert (tmp_path / 'runs' / 'relative' / 'checkpoints' / '3').is_dir()


@pytest.mark.parametrize(
  'data_state', [None, 'text', {'next_index': 3}, b'\xff\x00binary', b'utf8 bytes']
)
def test_data_state_types_round_trip(tmp_path, data_state):
  with ckpt_lib.Checkpointer(tmp_path, save_every=1, async_save=False) as ck:
    ck.save(1, {'x': jnp.ones(2)}, lambda: data_state, {'stage': 'vqgan'})
    _, data, cfg = ck.restore({'x': jax.ShapeDtypeStruct((2,), jnp.float32)})
  assert data == data_state and type(data) is type(data_state)
  assert cfg == {'stage': 'vqgan'}


def test_max_to_keep_and_save_every(tmp_path):
  ck = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, save_every=3)
  saved = [s for s in range(1, 11) if ck.save(s, {'x': jnp.full(2, s)}, None, {})]
  assert saved == [3, 6, 9]
  assert ck.save(10, {'x': jnp.full(2, 10)}, None, {}, force=True)
  # The step exists already (e.g. the final save right after a resume).
  assert not ck.save(10, {'x': jnp.full(2, 10)}, None, {}, force=True)
  ck.wait()
  assert ck.all_steps() == [9, 10]
  assert sorted(os.listdir(ck.directory)) == ['10', '9']
  restored, _, _ = ck.restore({'x': jax.ShapeDtypeStruct((2,), jnp.int32)}, step=9)
  np.testing.assert_array_equal(restored['x'], [9, 9])
  with pytest.raises(ckpt_lib.CheckpointError, match=r'step 3 .*\[9, 10\]'):
    ck.restore({'x': jax.ShapeDtypeStruct((2,), jnp.int32)}, step=3)
  ck.close()


def _shardings_2x4(mesh, state):
  def spec(x):
    if x.ndim == 4:
      return P(None, None, 'data', 'fsdp')
    if x.ndim == 2:
      return P('fsdp', 'data')
    if x.ndim == 1 and x.shape[0] % 4 == 0:
      return P('fsdp')
    return P()

  return jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), state)


def test_restore_onto_other_meshes(tmp_path):
  assert jax.device_count() == 8
  mesh8 = _mesh((8,), ('fsdp',))
  state = _state(mesh=mesh8)
  assert state['params']['codebook'].sharding.spec == P('fsdp')
  expected = _host(state)
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    ck.save(7, state, None, _config())

  ck = ckpt_lib.Checkpointer(tmp_path, read_only=True)
  # One device.
  one = SingleDeviceSharding(jax.devices()[3])
  target = ckpt_lib.abstract_like(state, one)
  restored, _, _ = ck.restore(target)
  _assert_bit_equal(restored, expected)
  for x in jax.tree.leaves(restored):
    assert x.sharding == one
  # A 2x4 mesh splitting the arrays differently.
  mesh = _mesh((2, 4), ('data', 'fsdp'))
  shardings = _shardings_2x4(mesh, state)
  restored, _, _ = ck.restore(ckpt_lib.abstract_like(state, shardings))
  _assert_bit_equal(restored, expected)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert x.sharding == s
  assert restored['params']['enc']['conv']['kernel'].sharding.spec == P(None, None, 'data', 'fsdp')
  ck.close()


def test_restore_params_subtree(tmp_path):
  mesh8 = _mesh((8,), ('fsdp',))
  state = _state(mesh=mesh8)
  with ckpt_lib.Checkpointer(tmp_path / 'stage1', save_every=1) as ck:
    ck.save(7, state, None, _config())
    ck.save(8, {**state, 'params': jax.tree.map(lambda x: x + 1, state['params'])}, None, _config())

  mesh = _mesh((2, 4), ('data', 'fsdp'))
  shardings = _shardings_2x4(mesh, state['params'])
  target = ckpt_lib.abstract_like(state['params'], shardings)
  params = ckpt_lib.restore_params(tmp_path / 'stage1', target)  # latest: 8
  _assert_bit_equal(_host(params), _host(jax.tree.map(lambda x: x + 1, state['params'])))
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert x.sharding == s
  params = ckpt_lib.restore_params(tmp_path / 'stage1', target, step=7)
  _assert_bit_equal(_host(params), _host(state['params']))
  # A nested key.
  conv = ckpt_lib.restore_params(
    tmp_path / 'stage1', ckpt_lib.abstract_like(state['params']['enc']), key='params/enc', step=7
  )
  np.testing.assert_array_equal(conv['conv']['bias'], state['params']['enc']['conv']['bias'])

  with pytest.raises(ckpt_lib.CheckpointError, match='nowhere'):
    ckpt_lib.restore_params(tmp_path / 'nowhere', target)
  os.makedirs(tmp_path / 'empty' / 'checkpoints')
  with pytest.raises(ckpt_lib.CheckpointError, match='no committed checkpoint.*empty'):
    ckpt_lib.restore_params(tmp_path / 'empty', target)
  with pytest.raises(
    ckpt_lib.CheckpointError, match="stage1.*no 'ema'.*top level holds: batch_stats, disc_params"
  ):
    ckpt_lib.restore_params(tmp_path / 'stage1', target, key='ema')


def test_incompatible_config_names_every_field(tmp_path):
  saved = run_config.config_to_dict(_config())
  # Lists from JSON equal tuples; train.* may differ on resume.
  new = _config()
  new.model.ch_mult = (1, 2)
  new.train.num_steps = 5000
  new.loss.disc_weight = 0.1
  run_config.check_compatible(saved, new)

  new = _config(ch=128, ch_mult=(1, 2, 4))
  new.loss.disc_ndf = 32
  new.stage = 'transformer'
  new.model.attn_resolutions = (8,)
  new.train.num_steps = 5000
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
    run_config.check_compatible(saved, new, where='/x/ckpt/7')
  msg = str(e.value)
  assert '/x/ckpt/7' in msg
  assert 'model.ch: checkpoint 64, config 128' in msg
  assert 'model.ch_mult: checkpoint [1, 2], config [1, 2, 4]' in msg
  assert 'loss.disc_ndf: checkpoint 16, config 32' in msg
  assert "stage: checkpoint 'vqgan', config 'transformer'" in msg
  assert 'model.attn_resolutions: checkpoint <absent>, config [8]' in msg
  assert 'num_steps' not in msg and 'disc_weight' not in msg
  # The field list is a parameter.
  run_config.check_compatible(saved, new, fields=('loss.disc_num_layers',))
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match='train.num_steps'):
    run_config.check_compatible(saved, new, fields=('train.*',))

  # restore(config=...) refuses before reading any array.
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    ck.save(1, {'x': jnp.ones(3)}, None, _config())
    with pytest.raises(
      ckpt_lib.IncompatibleCheckpointError, match='model.ch: checkpoint 64, config 128'
    ):
      ck.restore({'x': jax.ShapeDtypeStruct((3,), jnp.float32)}, config=new)


def test_interrupted_save_left_behind_is_ignored(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    ck.save(1, {'x': jnp.full(4, 1.0)}, 'one', {})
  # What an interrupted save leaves: a half-written temporary step directory.
  tmp = os.path.join(ck.directory, '2.orbax-checkpoint-tmp-1764172800000000')
  os.makedirs(os.path.join(tmp, 'state', 'd'))
  with open(os.path.join(tmp, 'state', 'd', 'chunk'), 'wb') as f:
    f.write(b'\0' * 100)

  target = {'x': jax.ShapeDtypeStruct((4,), jnp.float32)}
  reader = ckpt_lib.Checkpointer(tmp_path, read_only=True)
  assert reader.latest_step() == 1 and os.path.isdir(tmp)  # Readers keep it.
  x, data, _ = reader.restore(target)
  np.testing.assert_array_equal(x['x'], np.ones(4))
  assert data == 'one'
  reader.close()
  # The next writer clears it and saves that step again.
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    assert ck.latest_step() == 1
    assert ck.save(2, {'x': jnp.full(4, 2.0)}, 'two', {})
    assert ck.all_steps() == [1, 2]
    x, data, _ = ck.restore(target)  # Waits for the save in flight.
  np.testing.assert_array_equal(x['x'], np.full(4, 2.0))
  assert not os.path.exists(tmp)


def test_readers_write_nothing(tmp_path):
  """Readers open orbax without its read_only mode (which warns on every open), so this class
  keeps them from writing: no save, no cleanup, no metadata, nothing touched."""
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    ck.save(1, {'params': {'x': jnp.ones(2)}}, 'one', {'stage': 'vqgan'})
  os.makedirs(os.path.join(ck.directory, '2.orbax-checkpoint-tmp'))  # A writer's, mid-save.

  def tree():
    return sorted(
      (os.path.relpath(os.path.join(d, n), tmp_path), os.stat(os.path.join(d, n)).st_mtime_ns)
      for d, dirs, files in os.walk(tmp_path)
      for n in dirs + files
    )

  before = tree()
  target = {'params': {'x': jax.ShapeDtypeStruct((2,), jnp.float32)}}
  with ckpt_lib.Checkpointer(tmp_path, read_only=True) as reader:
    assert reader.restore(target)[1] == 'one' and reader.restore_config() == {'stage': 'vqgan'}
    assert not reader.should_save(5, force=True)
    assert not reader.save(5, {'params': {'x': jnp.ones(2)}}, None, {}, force=True)
  ckpt_lib.restore_params(tmp_path, target['params'])
  assert tree() == before


def test_missing_or_corrupt_checkpoint_names_the_path(tmp_path):
  target = {'x': jax.ShapeDtypeStruct((4,), jnp.float32)}
  with pytest.raises(ckpt_lib.CheckpointError, match=str(tmp_path / 'none')):
    ckpt_lib.Checkpointer(tmp_path / 'none', read_only=True)
  ck = ckpt_lib.Checkpointer(tmp_path / 'new')
  with pytest.raises(ckpt_lib.CheckpointError, match='No checkpoint in .*new'):
    ck.restore(target)
  ck.close()

  with ckpt_lib.Checkpointer(tmp_path / 'bad', save_every=1) as ck:
    ck.save(1, {'x': jnp.ones(4)}, None, {})
  step_dir = os.path.join(ck.directory, '1')
  for root, _, files in os.walk(os.path.join(step_dir, 'state')):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  ck = ckpt_lib.Checkpointer(tmp_path / 'bad', read_only=True)
  with pytest.raises(ckpt_lib.CheckpointError, match=f'{step_dir}'):
    ck.restore(target)
  ck.close()


_KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    import jax
    jax.config.update('jax_num_cpu_devices', 8)
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from vqgan_jax import checkpoints

    mesh = jax.make_mesh((8,), ('fsdp',))
    def state(step):  # ~64 MiB, sharded 8 ways.
      keys = jax.random.split(jax.random.key(step), 4)
      arrays = {f'w{i}': jax.random.normal(k, (4096, 1024)) for i, k in enumerate(keys)}
      return {'step': jnp.int32(step),
              'params': jax.device_put(arrays, NamedSharding(mesh, P('fsdp')))}

    ck = checkpoints.Checkpointer(sys.argv[1], save_every=1)
    ck.save(1, state(1), b'one', {'stage': 'vqgan'})
    ck.wait()
    s2 = jax.block_until_ready(state(2))
    ck.save(2, s2, b'two', {'stage': 'vqgan'})
    os.kill(os.getpid(), signal.SIGKILL)  # Right after save() returns.
""")


@pytest.mark.slow
def test_sigkill_during_async_save_keeps_last_committed(tmp_path):
  proc = subprocess.run(
    [sys.executable, '-c', _KILLED_CHILD, str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == -9, proc.stderr[-3000:]
  directory = ckpt_lib.checkpoint_dir(tmp_path)
  names = os.listdir(directory)
  # Usually the kill lands mid-write (a step-2 tmp dir is left); on a loaded machine it can
  # also land before the background write made its tmp dir, or after it committed. In every
  # case only step 2 may be unfinished, and the newest *committed* step restores whole.
  assert all(n.startswith('2.') for n in names if 'tmp' in n), names
  committed = sorted(int(n) for n in names if n.isdigit())
  assert committed in ([1], [1, 2]), names

  def state(step):
    keys = jax.random.split(jax.random.key(step), 4)
    return {
      'step': jnp.int32(step),
      'params': {f'w{i}': jax.random.normal(k, (4096, 1024)) for i, k in enumerate(keys)},
    }

  mesh = _mesh((2, 4), ('data', 'fsdp'))
  target = ckpt_lib.abstract_like(jax.eval_shape(lambda: state(1)), NamedSharding(mesh, P()))
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    latest = ck.latest_step()
    assert latest == committed[-1], names
    restored, data, _ = ck.restore(target)
  assert data == {1: b'one', 2: b'two'}[latest]
  _assert_bit_equal(_host(restored), _host(state(latest)))


def test_target_mismatch_names_the_leaves(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    ck.save(1, {'params': {'a': jnp.ones(3), 'b': jnp.ones(2)}}, None, {})
    with pytest.raises(
      ckpt_lib.CheckpointError,
      match=r'/1 does not match .*params/a: checkpoint shape '
      r'\(3,\), target shape \(4,\)',
    ):
      ck.restore(
        {
          'params': {
            'a': jax.ShapeDtypeStruct((4,), jnp.float32),
            'b': jax.ShapeDtypeStruct((2,), jnp.float32),
          }
        }
      )
    with pytest.raises(
      ckpt_lib.CheckpointError,
      match='missing in the checkpoint: params/c; in the '
      'checkpoint but not in the target: params/b',
    ):
      ck.restore(
        {
          'params': {
            'a': jax.ShapeDtypeStruct((3,), jnp.float32),
            'c': jax.ShapeDtypeStruct((2,), jnp.float32),
          }
        }
      )
  # A partial restore does not silently hand back an unrestored leaf.
  with pytest.raises(ckpt_lib.CheckpointError, match='missing in the checkpoint: params/new_layer'):
    ckpt_lib.restore_params(
      tmp_path,
      {
        'a': jax.ShapeDtypeStruct((3,), jnp.float32),
        'new_layer': jax.ShapeDtypeStruct((3,), jnp.float32),
      },
    )


_PROCESS = textwrap.dedent("""
    import os
    import sys
    import jax
    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update('jax_num_cpu_devices', 4)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                               num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from vqgan_jax import checkpoints

    mesh = jax.make_mesh((8,), ('fsdp',))  # Spans both processes.
    values = np.arange(16384.0).reshape(1024, 16)  # Too big to inline in OCDBT's index.
    w = jax.make_array_from_callback(values.shape, NamedSharding(mesh, P('fsdp')),
                                     lambda idx: values[idx])
    step = jax.make_array_from_callback((), NamedSharding(mesh, P()),
                                        lambda idx: np.int32(3))
    state = {'params': {'w': w}, 'step': step}
    with checkpoints.Checkpointer(workdir, save_every=1) as ck:
      assert ck.save(3, state, f'iterator {pid}'.encode(), {'stage': 'vqgan'})
      ck.wait()
      mesh2 = jax.make_mesh((2, 4), ('data', 'fsdp'))
      target = checkpoints.abstract_like(
          state, {'params': NamedSharding(mesh2, P('fsdp', 'data')),
                  'step': NamedSharding(mesh2, P())})
      restored, data, config = ck.restore(target)
    assert data == f'iterator {pid}'.encode(), data
    assert config == {'stage': 'vqgan'}, config
    got = multihost_utils.process_allgather(restored['params']['w'], tiled=True)
    np.testing.assert_array_equal(got, values)

    # Step 4 loses its array metadata, which every process reads: both skip it, and the
    # writer moves it aside once.
    with checkpoints.Checkpointer(workdir, save_every=1) as ck:
      assert ck.save(4, state, b'four', {'stage': 'vqgan'})
    multihost_utils.sync_global_devices('saved 4')
    if pid == 0:
      os.remove(os.path.join(ck.step_path(4), 'state', '_METADATA'))
    multihost_utils.sync_global_devices('damaged 4')
    class Iterator:
      def set_state(self, state):
        self.state = state
    it = Iterator()
    with checkpoints.Checkpointer(workdir, save_every=1) as ck:
      restored = ck.resume(target, it, config={'stage': 'vqgan'})
      assert ck.restored_step == 3 and ck.all_steps() == [3], (ck.restored_step, ck.all_steps())
    assert it.state == f'iterator {pid}'.encode(), it.state
    got = multihost_utils.process_allgather(restored['params']['w'], tiled=True)
    np.testing.assert_array_equal(got, values)
    print('OK', flush=True)
""")


@pytest.mark.slow
def test_two_processes_save_and_restore(tmp_path):
  """Every process saves its own iterator state; arrays span both processes."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = str(s.getsockname()[1])
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _PROCESS, str(i), port, str(tmp_path)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0 and 'OK' in out, out[-3000:]

  # One process, 8 devices: arrays restore; the two iterator states do not map.
  mesh = _mesh((8,), ('fsdp',))
  target = {
    'params': {
      'w': jax.ShapeDtypeStruct((1024, 16), jnp.float32, sharding=NamedSharding(mesh, P('fsdp')))
    },
    'step': jax.ShapeDtypeStruct((), jnp.int32),
  }
  with ckpt_lib.Checkpointer(tmp_path, read_only=True) as ck:
    restored, data, _ = ck.restore(target)
  assert data is None
  np.testing.assert_array_equal(restored['params']['w'], np.arange(16384.0).reshape(1024, 16))
  assert os.listdir(os.path.join(ck.directory, 'corrupt')) == ['4']
  assert int(restored['step']) == 3


def test_upgrade_config_fills_the_fields_a_saved_config_predates(tmp_path):
  """Read back, an old config has each added field at the value its absence meant, where its
  stage keeps model fields (a stage-2 run: its first stages'); a set field and the
  classifier's model are left alone."""
  from vqgan_jax import config_base  # pylint: disable=g-import-not-at-top

  stage2 = run_config.config_to_dict(config_base.stage2_base())
  for section in (stage2['stage1_config'], stage2['cond']['model']):
    del section['quantizer'], section['lfq_bits']
  del stage2['transformer']['kind']
  stage2['stage1_config']['codebook_dim'] = 4
  del stage2['sample']['iterations']
  stage2['sample']['steps'] = 5  # MaskGIT's decoding iterations, under their old name
  with ckpt_lib.Checkpointer(tmp_path) as ck:
    ck.save(1, {'w': np.zeros(2, np.float32)}, None, stage2, force=True)
  with ckpt_lib.Checkpointer(tmp_path, read_only=True, max_to_keep=None) as ck:
    got = ck.restore_config()
  assert got['stage1_config']['quantizer'] == got['cond']['model']['quantizer'] == 'vq'
  assert got['stage1_config']['lfq_bits'] == got['cond']['model']['lfq_bits'] == 0
  assert got['stage1_config']['codebook_dim'] == 4 and got['transformer']['kind'] == 'gpt'
  assert got['sample']['iterations'] == 5 and 'steps' not in got['sample']
  classifier = {'stage': 'classifier', 'model': {'width': 8}}
  assert run_config.upgrade_config(classifier) == classifier


def test_fields_added_later_default_to_their_old_meaning():
  """A checkpoint saved before model.quantizer/kl_weight/temperature existed resumes under a
  config that has their defaults (the VQ quantizer), but not under a Gumbel config."""
  from configs import common  # pylint: disable=g-import-not-at-top

  config = common.stage1_base()
  old = run_config.config_to_dict(config)
  for k in run_config.ADDED_FIELD_DEFAULTS:
    section, field = k.split('.')
    old.get(section, {}).pop(field, None)  # (stage-2 fields are not in a stage-1 config)
  assert run_config.config_differences(old, config) == []
  config.model.quantizer = 'gumbel'
  config.model.temperature = 0.5
  assert run_config.config_differences(old, config) == [
    "model.quantizer: checkpoint 'vq', config 'gumbel'",
    'model.temperature: checkpoint 1.0, config 0.5',
  ]
  # Issue 13's quantizer options: absent means the original's VQ; set, they differ.
  config.model.update(quantizer='vq', temperature=1.0, codebook_l2_norm=True, fsq_levels=(2, 2))
  assert run_config.config_differences(old, config) == [
    'model.codebook_l2_norm: checkpoint False, config True',
    'model.fsq_levels: checkpoint [], config [2, 2]',
  ]


# --------------------------------------------------------------------------
# Failure model (issue 11): unreadable steps, non-finite states, exit noise.


def _step_state(step):
  """A train-state-like pytree whose arrays differ per step."""
  return {**_state(step), 'step': jnp.asarray(step, jnp.int32)}


def _array_files(step_dir):
  """The files holding a step's array data (OCDBT's data files of process 0)."""
  d = os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd')
  return [os.path.join(d, n) for n in os.listdir(d)]


def _damage(step_dir, how):
  for f in _array_files(step_dir):
    if how == 'truncate':
      os.truncate(f, os.path.getsize(f) // 2)
    else:
      os.remove(f)


@pytest.mark.parametrize('damage', ['truncate', 'delete'])
def test_unreadable_latest_step_falls_back_to_the_newest_whole_one(tmp_path, damage, caplog):
  class Iterator:
    state = None

    def set_state(self, state):
      self.state = state

  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    for s in (1, 2, 3):
      ck.save(s, _step_state(s), f'at {s}'.encode(), _config())
  _damage(ck.step_path(3), damage)
  target = ckpt_lib.abstract_like(_step_state(0))

  # Read-only paths: the latest step is skipped with one line, nothing moves.
  with ckpt_lib.Checkpointer(tmp_path, read_only=True) as ck:
    assert ck.latest_step() == 3
    with caplog.at_level('WARNING'):
      state, data, _ = ck.restore(target, config=_config())
    _assert_bit_equal(state, _step_state(2))
    assert data == b'at 2' and ck.restored_step == 2
    # A step asked for by number is not replaced: one sentence naming it.
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=f'{ck.step_path(3)}: ') as e:
      ck.restore(target, step=3)
    assert '\n' not in str(e.value) and len(str(e.value)) < 700
  lines = [r.getMessage() for r in caplog.records if 'Skipped' in r.getMessage()]
  assert len(lines) == 1 and '\n' not in lines[0], lines
  assert lines[0].startswith('Skipped unreadable checkpoint step 3, restored step 2 instead: ')
  assert ck.step_path(3) in lines[0] and 'tensorstore_spec' not in lines[0]
  caplog.clear()
  with caplog.at_level('WARNING'):
    params = ckpt_lib.restore_params(tmp_path, ckpt_lib.abstract_like(_state()['params']))
  # Only the params' bytes are read: a truncation may spare them (then step 3 is whole
  # for this purpose); a deleted file never does.
  skipped = any("restored 'params' from step 2" in r.getMessage() for r in caplog.records)
  assert skipped or damage == 'truncate'
  _assert_bit_equal(params, _step_state(2 if skipped else 3)['params'])

  # A resuming writer moves the step aside and saves that step number afresh.
  caplog.clear()
  it = Iterator()
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    with caplog.at_level('WARNING'):
      state = ck.resume(target, it, config=_config())
    assert int(state['step']) == 2 and it.state == b'at 2'
    aside = os.path.join(ck.directory, 'corrupt', '3')
    assert any(
      f'step 3 (moved to {aside}), resumed from step 2 instead: ' in r.getMessage()
      for r in caplog.records
    )
    assert ck.all_steps() == [1, 2] and os.path.isdir(aside)
    assert ck.save(3, _step_state(3), b'at 3 again', _config())
    state, data, _ = ck.restore(target)
  assert data == b'at 3 again'
  _assert_bit_equal(state, _step_state(3))


def test_no_readable_step_is_one_sentence(tmp_path):
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    for s in (1, 2):
      ck.save(s, {'x': jax.random.normal(jax.random.key(s), (64, 64))}, None, {})
  for s in (1, 2):
    _damage(ck.step_path(s), 'delete')
  target = {'x': jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  with ckpt_lib.Checkpointer(tmp_path, read_only=True) as ck:
    with pytest.raises(
      ckpt_lib.CheckpointError,
      match=r'No checkpoint in .*checkpoints can be read: step 2: .*; step 1: ',
    ):
      ck.restore(target)
  with pytest.raises(ckpt_lib.CheckpointError, match='can be read: step 2: .*; step 1: '):
    ckpt_lib.restore_params(tmp_path, target['x'], key='x')


def test_non_finite_state_is_never_saved(tmp_path):
  """A diverged state is refused on the steps that save, so max_to_keep never rotates a
  good checkpoint out for it."""
  mesh8 = _mesh((8,), ('fsdp',))
  with ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, save_every=2) as ck:
    with pytest.raises(ckpt_lib.NonFiniteStateError, match='no earlier checkpoint'):
      ck.save(2, {'x': jnp.full(2, jnp.nan)}, None, {})
    good = _state(mesh=mesh8)
    assert ck.save(2, good, None, _config())
    assert ck.save(4, good, None, _config())
    nan = jax.tree.map(
      lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, good['params']
    )
    bad = {**good, 'params': {**good['params'], 'codebook': nan['codebook']}}
    # Not a saving step: nothing is checked, nothing written.
    assert not ck.should_save(5) and not ck.save(5, bad, None, _config())
    assert ck.should_save(6)
    called = []
    with pytest.raises(
      ckpt_lib.NonFiniteStateError,
      match=r'Step 6: .*NaN or Inf in params/codebook, so it was not saved; '
      r'the last good checkpoint, step 4, stays in .*checkpoints\.',
    ) as e:
      ck.save(6, bad, lambda: called.append(1), _config())
    assert isinstance(e.value, FloatingPointError) and not called
    inf_opt = {**good, 'opt_state': jax.tree.map(lambda x: x + jnp.inf, good['opt_state'])}
    with pytest.raises(ckpt_lib.NonFiniteStateError, match=r'opt_state/0/mu/codebook'):
      ck.save(7, inf_opt, None, _config(), force=True)
    ck.wait()
    assert ck.all_steps() == [2, 4]
    assert sorted(os.listdir(ck.directory)) == ['2', '4']


def test_multi_process_array_read_errors_do_not_fall_back(monkeypatch):
  """Each process reads only its shards, so processes could disagree on a damaged step:
  there the error names the way out instead of skipping."""
  path = '/w/checkpoints/4'
  assert isinstance(ckpt_lib._array_read_error('x', path), ckpt_lib.CorruptCheckpointError)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  e = ckpt_lib._array_read_error(
    'Could not restore state from checkpoint /w/checkpoints/4: ValueError: NOT_FOUND', path
  )
  assert not isinstance(e, ckpt_lib.CorruptCheckpointError)
  assert str(e).endswith(
    'NOT_FOUND. A multi-process run does not skip an unreadable step '
    '(its processes could disagree on it): move /w/checkpoints/4 out of '
    '/w/checkpoints to resume from the step before it.'
  )


def test_read_only_restores_are_quiet(tmp_path, caplog):
  with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
    ck.save(1, {'params': {'x': jnp.ones(2)}}, None, {})
  target = {'params': {'x': jax.ShapeDtypeStruct((2,), jnp.float32)}}
  with caplog.at_level('DEBUG'), ckpt_lib.Checkpointer(tmp_path, read_only=True) as ck:
    ck.restore(target)
  with caplog.at_level('DEBUG'):
    ckpt_lib.restore_params(tmp_path, target['params'])
  noise = [
    r.getMessage()
    for r in caplog.records
    if r.levelno >= 30 and 'read only' in r.getMessage().replace('read_only', 'read only')
  ]
  assert not noise, noise
  assert not logging.getLogger('absl').filters  # The filter was scoped to our managers.


def test_close_from_with_and_finally(tmp_path):
  """A trainer closes in `finally` (or leaves a `with`) on its way out of an error, maybe
  twice: the pending save commits once and later closes do nothing."""
  with pytest.raises(RuntimeError, match='boom'):
    with ckpt_lib.Checkpointer(tmp_path, save_every=1) as ck:
      assert ck.save(1, {'x': jnp.ones(2)}, None, {})
      raise RuntimeError('boom')
  ck.close()
  ck.close()
  assert os.listdir(ck.directory) == ['1'] and id(ck) not in orbax_workarounds._OPEN


_EXIT_EARLY = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    from vqgan_jax import checkpoints
    ck = checkpoints.Checkpointer(sys.argv[1], save_every=1)
    ck.save(1, {'x': jnp.ones(4)}, None, {})
    raise SystemExit('the run stops before its first batch')  # No close().
""")


def test_exit_with_a_save_in_flight_is_quiet(tmp_path):
  """A run that raises past an open Checkpointer commits its save and exits with only its
  own message (orbax's threads used to print tracebacks and wait minutes)."""
  proc = subprocess.run(
    [sys.executable, '-c', _EXIT_EARLY, str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=90,
    check=False,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == 1
  assert proc.stderr.strip() == 'the run stops before its first batch', proc.stderr[-3000:]
  assert os.listdir(ckpt_lib.checkpoint_dir(tmp_path)) == ['1']


_FULL_DISK = textwrap.dedent("""
    import resource
    import signal
    import sys
    # A real limit: writes past 64 KiB fail with EFBIG (File too large), not SIGXFSZ.
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import jax
    import jax.numpy as jnp
    from vqgan_jax import checkpoints
    keys = jax.random.split(jax.random.key(0), 8)
    try:
      with checkpoints.Checkpointer(sys.argv[1], save_every=1) as ck:
        ck.save(1, {'x': jnp.ones(4)}, None, {})
        # Eight concurrent writes of 256 KiB each, over the file size limit.
        ck.save(2, {'x': jnp.ones(4), **{f'y{i}': jax.random.normal(k, (65536,)) for i, k in
                                          enumerate(keys)}}, None, {})
    except checkpoints.CheckpointError as e:  # As main does.
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
""")


def test_failed_save_is_one_sentence_and_leaves_no_temporary(tmp_path):
  """A save that hits a real file size limit (a full disk reads the same) is one sentence
  naming the step and its path, with none of orbax's thread tracebacks or the 'Event loop is
  closed' of its abandoned writes; its temporary directory is removed, and the step before
  it restores."""
  proc = subprocess.run(
    [sys.executable, '-c', _FULL_DISK, str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=90,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  directory = ckpt_lib.checkpoint_dir(tmp_path)
  assert proc.returncode == 2, proc.stderr[-3000:]
  [line] = proc.stderr.splitlines()
  assert line.startswith(f'error: Could not write checkpoint step 2 to {directory}/2: '), line
  assert 'File too large' in line, line
  assert os.listdir(directory) == ['1']  # No 2.orbax-checkpoint-tmp.
  with ckpt_lib.Checkpointer(tmp_path) as ck:
    state, _, _ = ck.restore({'x': jax.ShapeDtypeStruct((4,), jnp.float32)})
  np.testing.assert_array_equal(state['x'], np.ones(4))


def test_params_fingerprint_is_the_values_on_any_mesh():
  """The tokenizer fingerprint of a codes dataset: the same values give the same digest
  however they are sharded; one changed value, or a renamed leaf, another."""
  rng = np.random.RandomState(0)
  params = {'enc': {'kernel': rng.randn(8, 4).astype(np.float32)}, 'b': np.arange(3.0)}
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('x',))
  sharded = dict(
    params,
    enc={'kernel': jax.device_put(params['enc']['kernel'], NamedSharding(mesh, P('x')))},
  )
  digest = fingerprint.params_fingerprint(params)
  assert len(digest) == 64 and fingerprint.params_fingerprint(sharded) == digest
  nudged = {'enc': {'kernel': params['enc']['kernel'] + np.float32(1e-6)}, 'b': params['b']}
  assert fingerprint.params_fingerprint(nudged) != digest
  assert fingerprint.params_fingerprint({'enc': params['enc'], 'c': params['b']}) != digest
