"""The quantizers beyond the original (issue 13) and the train-state entries they add.

Module-level math on tiny arrays (no model compiles): straight-through gradients, index <->
vector round trips, FSQ's bijection, LFQ's entropy term, the EMA codebook update and
dead-code restart against hand computations, and the codebook updates sharded on 8 fake
devices against one. One tiny train step (a stand-in for LPIPS, every new option on) is
compiled once for the kill/resume check; the old-workdir check only restores.
"""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqgan_jax import checkpoints
from vqgan_jax import config_base
from vqgan_jax import losses
from vqgan_jax import parallel
from vqgan_jax import run_config
from vqgan_jax import validate
from vqgan_jax.models import quantizer as Q
from vqgan_jax.models import vqgan as vqgan_lib
from vqgan_jax.models.discriminator import NLayerDiscriminator
from vqgan_jax.train import stage1
from vqgan_jax.train import vqgan_trainer

SIZE, BATCH = 16, 8


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_equal_trees(got, want, **tol):
  """Leaf by leaf (same structure), bit-equal unless tolerances are given."""
  got = _host(got)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    if tol:
      np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **tol)
    else:
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _config(**model):
  """A tiny stage-1 config (f2, 16x16 images, no attention)."""
  c = config_base.stage1_smoke(config_base.stage1_base())
  tiny = dict(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    resolution=SIZE,
    z_channels=16,
    n_embed=32,
    embed_dim=8,
  )
  c.model.update({**tiny, **model})
  c.loss.update(disc_start=0, disc_ndf=8, disc_num_layers=2)
  c.data.image_size = SIZE
  c.train.update(batch_size=BATCH, eval_batch_size=BATCH)
  c.mesh.update(data=1, fsdp=1)
  return c


# ---------------------------------------------------------------------------------------------
# Straight-through gradients and round trips, per quantizer.

Z = jax.random.normal(jax.random.key(0), (2, 3, 3, 4)) * 1.5
W = jax.random.normal(jax.random.key(1), Z.shape)

QUANTIZERS = {
  'vq': Q.VectorQuantizer(16, 4),
  'vq_low_dim_l2': Q.VectorQuantizer(16, 4, codebook_dim=3, l2_norm=True),
  'vq_ema': Q.VectorQuantizer(16, 4, ema=True),
  'fsq': Q.FSQuantizer((8, 5, 5, 5)),
  'lfq': Q.LookupFreeQuantizer(4),
}


_PARAMS = {}


def _params(name):
  """{'params': ...} of QUANTIZERS[name] (or a Gumbel quantizer), initialised once."""
  if name not in _PARAMS:
    q = QUANTIZERS.get(name) or Q.GumbelQuantizer(6, 4)
    _PARAMS[name] = {'params': jax.jit(q.init)(jax.random.key(2), Z).get('params', {})}
  return _PARAMS[name]


def _unquantized(name, q, variables, z):
  """What the quantizer's forward is with the rounding / lookup replaced by the identity:
  straight-through means its gradient is the quantizer's."""
  if name.startswith('vq'):
    zc = q.apply(variables, z, method='latents')
    return q.apply(variables, zc, method=lambda m, v: m.proj_out(v)) if q.codebook_dim else zc
  if name == 'fsq':
    return Q.fsq_bound(z, q.levels) / jnp.asarray([l // 2 for l in q.levels], jnp.float32)
  return z


@pytest.mark.parametrize('name', list(QUANTIZERS))
def test_straight_through_gradient(name):
  q, params = QUANTIZERS[name], _params(name)

  @jax.jit
  def grads(params, z):
    g = jax.grad(lambda z: jnp.sum(q.apply(params, z)[0] * W))(z)
    want = jax.grad(lambda z: jnp.sum(_unquantized(name, q, params, z) * W))(z)
    # Gradients reaching the params through z_q, and through the loss.
    gp = jax.grad(lambda p: jnp.sum(q.apply(p, z)[0] * W))(params)
    gl = jax.grad(lambda p: q.apply(p, z)[1])(params)
    return g, want, gp, gl

  g, want, gp, gl = grads(params, Z)
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(g))) > 0
  if name.startswith('vq'):
    # The codebook gets no gradient through z_q; only from the loss's codebook term, which
    # the EMA codebook drops (its statistics move it instead).
    assert float(jnp.abs(gp['params']['embedding']['embedding']).max()) == 0.0
    codebook_grad = float(jnp.abs(gl['params']['embedding']['embedding']).max())
    assert (codebook_grad == 0.0) == q.ema


def test_straight_through_gradient_gumbel():
  """Gumbel: the gradient of the hard one-hot is that of the soft weights."""
  q, params = Q.GumbelQuantizer(6, 4), _params('gumbel')
  g_noise = jax.random.gumbel(jax.random.key(3), Z.shape[:-1] + (6,))
  fwd = lambda z: q.apply(params, z, train=True, gumbels=g_noise)[0]

  def soft(z):
    logits = q.apply(params, z, method='logits')
    weights = jax.nn.softmax(logits + g_noise, axis=-1)
    return weights @ params['params']['embed']['embedding']

  g, want = jax.jit(
    lambda z: (
      jax.grad(lambda z: jnp.sum(fwd(z) * W))(z),
      jax.grad(lambda z: jnp.sum(soft(z) * W))(z),
    )
  )(Z)
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', list(QUANTIZERS) + ['gumbel'])
def test_indices_round_trip_through_lookup(name):
  q, params = QUANTIZERS.get(name) or Q.GumbelQuantizer(6, 4), _params(name)
  z_q, _, idx = jax.jit(q.apply)(params, Z)
  assert idx.shape == Z.shape[:-1] and idx.dtype == jnp.int32
  lookup = jax.jit(lambda p, i: q.apply(p, i, method='lookup'))
  np.testing.assert_allclose(lookup(params, idx), z_q, atol=1e-6)
  if name == 'lfq':  # its codes are their own signs (FSQ's bijection: the next test)
    np.testing.assert_array_equal(q.apply(params, lookup(params, idx))[2], idx)


def test_fsq_index_map_is_a_bijection():
  levels = (8, 5, 5, 5)
  n = math.prod(levels)
  # Every grid point (digit tuple) maps to a distinct index in [0, n) ...
  digits = np.array(list(itertools.product(*[range(l) for l in levels])), np.float32)
  half = np.array([l // 2 for l in levels], np.float32)
  idx = np.asarray(Q.fsq_codes_to_indices(jnp.asarray((digits - half) / half), levels))
  np.testing.assert_array_equal(np.sort(idx), np.arange(n))
  # ... and back: codes(i) -> i for every index, codes on the grid in [-1, 1].
  codes = Q.fsq_indices_to_codes(jnp.arange(n), levels)
  np.testing.assert_array_equal(Q.fsq_codes_to_indices(codes, levels), np.arange(n))
  assert float(jnp.min(codes)) == -1.0 and float(jnp.max(codes)) <= 1.0
  # The forward reaches every level of every channel (here: huge latents hit the extremes).
  q = Q.FSQuantizer(levels)
  _, loss, got = q.apply({}, jnp.asarray(np.linspace(-6, 6, 4000)[:, None].repeat(4, 1)))
  assert float(loss) == 0.0 and int(got.min()) == 0 and int(got.max()) == n - 1


def test_lfq_indices_are_the_sign_bits():
  z = jnp.asarray([[0.3, -1.0, 2.0, -0.1], [-1.0, -1.0, -1.0, 0.5]])
  _, _, idx = Q.LookupFreeQuantizer(4).apply({}, z)
  np.testing.assert_array_equal(idx, [0b1010, 0b0001])  # first channel = most significant bit
  np.testing.assert_array_equal(Q.lfq_codes(jnp.arange(16), 4)[5], [-1, 1, -1, 1])


def _entropy(p, axis=-1):
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=axis)


def test_lfq_entropy_loss_equals_a_hand_computation(monkeypatch):
  rng = np.random.default_rng(0)
  z = rng.normal(0, 0.02, (6, 3)).astype(np.float64)
  t = 0.01
  codes = np.array(list(itertools.product([-1.0, 1.0], repeat=3)))  # all 8 codes
  logits = 2 * z @ codes.T / t  # -distance logits
  q = np.exp(logits - logits.max(1, keepdims=True))
  q /= q.sum(1, keepdims=True)
  want = np.mean(_entropy(q)) - _entropy(q.mean(0))
  got = float(Q.lfq_entropy_loss(jnp.asarray(z, jnp.float32), t))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Above LFQ_EXACT_BITS the batch entropy is per bit (its upper bound); the per-latent part
  # stays exact.
  p = 1 / (1 + np.exp(-4 * z / t))
  bern = lambda p: -(p * np.log(p) + (1 - p) * np.log(1 - p))
  want_bits = np.mean(np.sum(bern(p), 1)) - np.sum(bern(p.mean(0)))
  monkeypatch.setattr(Q, 'LFQ_EXACT_BITS', 2)
  np.testing.assert_allclose(
    float(Q.lfq_entropy_loss(jnp.asarray(z, jnp.float32), t)), want_bits, rtol=1e-4, atol=1e-5
  )
  # The module's loss: beta x commitment + the weight x this term.
  zz = jnp.asarray(z, jnp.float32)
  _, loss, _ = Q.LookupFreeQuantizer(3, beta=0.25).apply({}, zz, 0.1, t)
  commit = np.mean((z - np.sign(z)) ** 2)
  np.testing.assert_allclose(float(loss), 0.25 * commit + 0.1 * want_bits, rtol=1e-4)


def test_entropy_weight_anneals_linearly():
  w = [float(losses.annealed_weight(s, 0.1, 100, 3.0)) for s in (0, 50, 100, 500)]
  np.testing.assert_allclose(w, [0.3, 0.2, 0.1, 0.1], rtol=1e-6)
  assert float(losses.annealed_weight(7, 0.1, 0, 3.0)) == pytest.approx(0.1)


def test_lecam_reg_and_r1_hand_computation():
  real, fake = jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([1.0, -2.0, 0.0])
  want = np.mean(np.maximum([0.5 - 0.2, -1.2, 1.8], 0) ** 2) + np.mean(
    np.maximum([0.3 - 1.0, 2.3, 0.3], 0) ** 2
  )
  assert float(losses.lecam_reg(real, fake, 0.3, 0.2)) == pytest.approx(want, rel=1e-6)
  ema = losses.lecam_ema_update({'real': 0.0, 'fake': 1.0}, real, fake, 0.9)
  assert float(ema['real']) == pytest.approx(0.1 * 0.5)
  assert float(ema['fake']) == pytest.approx(0.9 - 0.1 / 3)
  # D(x) = sum(a x^2) per image: grad = 2 a x, penalty = mean_b sum (2 a x)^2.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 1)), jnp.float32)
  r1 = losses.r1_penalty(lambda inp: 1.5 * jnp.sum(inp**2, axis=(1, 2, 3)), x)
  np.testing.assert_allclose(float(r1), np.mean(np.sum((3 * np.asarray(x)) ** 2, (1, 2, 3))))


# ---------------------------------------------------------------------------------------------
# The codebook updates of the train step (stage1._codebook_updates), without the model.


def _codebook_inputs(k=4, d=2, n=6, seed=0, restart_window=0, ema_decay=0.9):
  c = _config(n_embed=k, embed_dim=d, ema_decay=ema_decay, restart_window=restart_window)
  c.train.usage_window = 3
  rng = np.random.default_rng(seed)
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  state = {
    'quantizer': {
      'quantize': {
        'ema_count': rng.uniform(0.5, 3, k).astype(np.float32),
        'ema_sum': rng.normal(size=(k, d)).astype(np.float32),
      }
    },
    'code_last_used': np.asarray([5, 1, 6, 0], np.int32)[:k],
  }
  if not ema_decay:
    del state['quantizer']
  params = {'quantize': {'embedding': {'embedding': codebook}}, 'other': np.ones(3, np.float32)}
  latents = rng.normal(size=(n, d)).astype(np.float32)
  indices = np.asarray([0, 2, 2, 0, 2, 0], np.int32)[:n]
  return c, state, params, indices, latents


def test_fresh_ema_statistics_are_the_modules_own():
  """The VQ's train-time state made from params (a converted or init_from run) is the one its
  module's init makes."""
  variables = jax.jit(QUANTIZERS['vq_ema'].init)(jax.random.key(2), Z)
  c = _config(ema_decay=0.99)
  fresh = stage1.fresh_optional_state(c, ['quantizer'], {'quantize': variables['params']})
  _assert_equal_trees(fresh['quantizer']['quantize'], _host(variables['quantizer']))


def test_ema_update_equals_a_hand_computation():
  c, state, params, indices, latents = _codebook_inputs()
  t = 7
  new_params, out, metrics = stage1._codebook_updates(
    c, state, params, indices, latents, t, jax.random.key(0)
  )
  count0 = state['quantizer']['quantize']['ema_count'].astype(np.float64)
  sum0 = state['quantizer']['quantize']['ema_sum'].astype(np.float64)
  onehot = np.eye(4)[indices]
  count = 0.9 * count0 + 0.1 * onehot.sum(0)
  ssum = 0.9 * sum0 + 0.1 * onehot.T @ latents
  n = count.sum()
  smoothed = (count + stage1.EMA_EPS) / (n + 4 * stage1.EMA_EPS) * n
  got = out['quantizer']['quantize']
  np.testing.assert_allclose(got['ema_count'], count, rtol=1e-6)
  np.testing.assert_allclose(got['ema_sum'], ssum, rtol=1e-5, atol=1e-6)
  # The inference codebook is in params, the rest of params untouched.
  np.testing.assert_allclose(
    new_params['quantize']['embedding']['embedding'], ssum / smoothed[:, None], rtol=1e-5
  )
  assert new_params['other'] is params['other']
  # Usage: codes 0 and 2 picked at t=7; 5 (code 0's old value) is inside the 3-step window.
  np.testing.assert_array_equal(out['code_last_used'], [7, 1, 7, 0])
  assert float(metrics['window_usage']) == 0.5
  assert 'codes_restarted' not in metrics


@pytest.mark.parametrize('ema_decay', [0.0, 0.9])
def test_dead_code_restart_touches_only_dead_codes(ema_decay):
  c, state, params, indices, latents = _codebook_inputs(restart_window=3, ema_decay=ema_decay)
  t = 7  # last used after this batch [7, 1, 7, 0]: codes 1 and 3 are dead (>= 3 steps)
  run = lambda key: stage1._codebook_updates(c, state, params, indices, latents, t, key)
  new_params, out, metrics = run(jax.random.key(0))
  base, _, _ = stage1._codebook_updates(
    _codebook_inputs(ema_decay=ema_decay)[0], state, params, indices, latents, t, None
  )
  before = np.asarray(base['quantize']['embedding']['embedding'])
  after = np.asarray(new_params['quantize']['embedding']['embedding'])
  dead = np.array([False, True, False, True])
  np.testing.assert_array_equal(after[~dead], before[~dead])
  for row in after[dead]:  # each re-seeded from one of the batch's latents
    assert np.any(np.all(np.isclose(latents, row), axis=1)), row
  assert int(metrics['codes_restarted']) == 2
  np.testing.assert_array_equal(out['code_last_used'], [7, 7, 7, 7])
  assert float(metrics['window_usage']) == 0.5  # measured before the restart
  if ema_decay:
    stats = out['quantizer']['quantize']
    np.testing.assert_array_equal(np.asarray(stats['ema_count'])[dead], [1.0, 1.0])
    np.testing.assert_allclose(np.asarray(stats['ema_sum'])[dead], after[dead])
  # Deterministic per key; another key draws other latents.
  again = run(jax.random.key(0))[0]['quantize']['embedding']['embedding']
  np.testing.assert_array_equal(again, after)
  draws = {
    tuple(np.asarray(run(jax.random.key(s))[0]['quantize']['embedding']['embedding'])[1])
    for s in range(8)
  }
  assert len(draws) > 1


def test_codebook_state_sharded_on_8_devices_equals_1():
  """The EMA statistics (global sums over a batch split over data x fsdp), the usage record
  and the restart draws (a gather from the sharded latents) of the train step, jitted on a
  data=2 x fsdp=2 x tensor=2 mesh with the state in its train shardings, against 1 device."""
  k, d, n = 4096, 8, 512  # big enough that ema_sum and code_last_used shard over fsdp
  c = _config(n_embed=k, embed_dim=d, ema_decay=0.95, restart_window=2)
  rng = np.random.default_rng(1)
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  state = {
    'quantizer': {
      'quantize': {'ema_count': np.ones(k, np.float32), 'ema_sum': codebook.copy()},
    },
    'code_last_used': rng.integers(0, 6, k).astype(np.int32),
  }
  params = {'quantize': {'embedding': {'embedding': codebook}}}
  latents = rng.normal(size=(n, 1, 1, d)).astype(np.float32)
  indices = rng.integers(0, k, (n, 1, 1)).astype(np.int32)

  def run(mesh):
    rules = parallel.axis_rules(c)
    sh = parallel.state_shardings(jax.eval_shape(lambda: (state, params)), mesh, rules)
    batch = parallel.batch_sharding(mesh)
    fn = jax.jit(
      lambda s, p, i, z: stage1._codebook_updates(c, s, p, i, z, 6, jax.random.key(4)),
      in_shardings=(*sh, batch, batch),
      out_shardings=(sh[1], {k: sh[0][k] for k in ('quantizer', 'code_last_used')}, None),
    )
    return fn(*jax.device_put((state, params), sh), indices, latents)

  mesh8 = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  got = run(mesh8)
  want = _host(run(parallel.make_mesh({'data': 1}, devices=jax.devices()[:1])))
  assert 'fsdp' in tuple(got[1]['quantizer']['quantize']['ema_sum'].sharding.spec)
  assert tuple(got[1]['code_last_used'].sharding.spec) == ('fsdp',)
  assert int(want[2]['codes_restarted']) > 0
  _assert_equal_trees(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Models, configs and validation.


def test_old_config_builds_the_original_vq():
  """A saved config from before these fields, upgraded as a checkpoint's is read, builds the
  original's quantizer."""
  fields = run_config.config_to_dict(_config().model)
  for name in ('codebook_dim', 'codebook_l2_norm', 'ema_decay', 'restart_window', 'fsq_levels'):
    del fields[name]
  del fields['lfq_bits'], fields['quantizer']
  old = run_config.upgrade_config({'model': fields, 'loss': {}, 'train': {}})
  fields = old['model']
  vq = vqgan_lib.from_config(fields)
  assert (vq.quantizer, vq.codebook_dim, vq.codebook_l2_norm, vq.ema_decay) == ('vq', 0, False, 0)
  q = vq.bind({}).quantize  # unbound setup fields
  assert isinstance(q, Q.VectorQuantizer) and not q.ema and q.search_dim == vq.embed_dim
  assert stage1.optional_state_keys(ml_collections.ConfigDict(old)) == ()


def test_n_embed_must_equal_the_code_count():
  with pytest.raises(ValueError, match='gives 1000 codes'):
    vqgan_lib.VQGAN(quantizer='fsq', fsq_levels=(8, 5, 5, 5), embed_dim=4, n_embed=1024).init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3))
    )
  assert Q.QUANTIZERS['lfq'].num_codes(ml_collections.ConfigDict(dict(lfq_bits=10))) == 1024


def test_a_registered_quantizer_plugs_in(monkeypatch):
  """A new quantizer is its module and one registry entry: the config checks, the VQGAN and
  the train step's hooks find it by name (here FSQ's module under another name, with a check
  of its own)."""

  def checks(m):
    if len(m.fsq_levels) != 2:
      yield 'config.model.fsq_levels: toy needs 2 levels'

  spec = Q.QuantizerSpec(
    build=lambda m: Q.FSQuantizer(tuple(m.fsq_levels)),
    num_codes=lambda m: math.prod(m.fsq_levels),
    validate=checks,
  )
  monkeypatch.setitem(Q.QUANTIZERS, 'toy', spec)
  c = _config(quantizer='toy', fsq_levels=(4, 4), embed_dim=2, n_embed=16)
  validate.validate_stage1(c)
  assert 'quantizer' not in stage1.optional_state_keys(c)  # no train-time state of its own
  vqgan = vqgan_lib.from_config(c.model)
  x = jnp.zeros((1, SIZE, SIZE, 3))
  variables = jax.eval_shape(vqgan.init, jax.random.key(0), x)
  assert set(variables['params']) == {'encoder', 'decoder', 'quant_conv', 'post_quant_conv'}
  indices = jax.eval_shape(lambda v: vqgan.apply(v, x, method='encode_to_indices'), variables)
  assert indices.shape == (1, SIZE // 2, SIZE // 2)
  c.model.fsq_levels = (2, 2, 4)
  c.model.update(embed_dim=3)
  with pytest.raises(validate.ConfigError, match='toy needs 2 levels'):
    validate.validate_stage1(c)
  c.model.update(quantizer='toy', fsq_levels=(4, 4), embed_dim=2, ema_decay=0.5)
  with pytest.raises(validate.ConfigError, match="applies to quantizer='vq' only"):
    validate.validate_stage1(c)


@pytest.mark.parametrize(
  'field,update',
  [
    ('config.model.quantizer', dict(quantizer='rq')),
    ('config.model.n_embed', dict(quantizer='fsq', fsq_levels=(8, 5, 5, 5), embed_dim=4)),
    ('config.model.embed_dim', dict(quantizer='fsq', fsq_levels=(8, 5, 5, 5), n_embed=1000)),
    ('config.model.fsq_levels', dict(quantizer='fsq', fsq_levels=(8, 1), embed_dim=2, n_embed=8)),
    ('config.model.n_embed', dict(quantizer='lfq', lfq_bits=8, embed_dim=8)),
    ('config.model.lfq_bits', dict(quantizer='lfq', lfq_bits=0)),
    ('config.model.codebook_dim', dict(quantizer='lfq', lfq_bits=5, embed_dim=5, codebook_dim=4)),
    ('config.model.ema_decay', dict(ema_decay=1.0)),
    ('config.model.restart_window', dict(restart_window=-1)),
  ],
)
def test_validate_names_the_quantizer_field(field, update):
  c = _config()
  validate.validate_stage1(c)
  c.model.update(**update)
  with pytest.raises(validate.ConfigError) as e:
    validate.validate_stage1(c)
  assert field in str(e.value) and '\n' not in str(e.value), str(e.value)


@pytest.mark.parametrize(
  'field,section,update',
  [
    ('config.loss.lecam_weight', 'loss', dict(lecam_weight=-1.0)),
    ('config.loss.lecam_decay', 'loss', dict(lecam_decay=1.0)),
    ('config.loss.r1_weight', 'loss', dict(r1_weight=-0.1)),
    ('config.loss.entropy_temperature', 'loss', dict(entropy_temperature=0.0)),
    ('config.loss.entropy_anneal_factor', 'loss', dict(entropy_anneal_factor=0.5)),
    ('config.train.params_ema_decay', 'train', dict(params_ema_decay=1.5)),
    ('config.train.usage_window', 'train', dict(usage_window=-1)),
    ('config.train.usage_warning', 'train', dict(usage_warning=2.0)),
  ],
)
def test_validate_names_the_gan_and_health_field(field, section, update):
  c = _config()
  c[section].update(**update)
  with pytest.raises(validate.ConfigError) as e:
    validate.validate_stage1(c)
  assert field in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_valid_new_configs():
  for model in (
    dict(quantizer='fsq', fsq_levels=(8, 5, 5, 5), embed_dim=4, n_embed=1000),
    dict(quantizer='lfq', lfq_bits=10, embed_dim=10, n_embed=1024),
    dict(codebook_dim=8, codebook_l2_norm=True, ema_decay=0.99, restart_window=50),
  ):
    validate.validate_stage1(_config(**model))


# ---------------------------------------------------------------------------------------------
# The train step with every new option: resume after a kill; an old workdir resumes as 'vq'.


class _LPIPSStandIn(nn.Module):
  """A cheap stand-in for LPIPS (per-image mean |x - y|): the step's plumbing is the same,
  without compiling VGG16."""

  @nn.compact
  def __call__(self, x, y, deterministic=True):
    w = self.param('w', nn.initializers.ones, ())
    return w * jnp.mean(jnp.abs(x - y), axis=(1, 2, 3), keepdims=True)


def _models(config):
  disc = NLayerDiscriminator(ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers)
  return stage1.Models(vqgan_lib.from_config(config.model), disc, _LPIPSStandIn())


def _init(config, models, optional=None):
  # The 'unsafe_rbg' PRNG compiles the init ~3x faster on XLA:CPU (see test_train.py).
  state = jax.jit(lambda k: stage1.init_state(config, models, k, optional=optional))(
    jax.random.key(3, impl='unsafe_rbg')
  )
  state['rng'] = jax.random.PRNGKey(3)
  return _host(state)


class _Iterator:
  def get_state(self):
    return None

  def set_state(self, state):
    raise AssertionError('no data state was saved')


@pytest.fixture(scope='module')
def mesh1():
  return parallel.make_mesh({'data': 1}, devices=jax.devices()[:1])


def test_resume_after_a_kill_restores_quantizer_and_ema_state_exactly(tmp_path, mesh1):
  """Two steps, a checkpoint, two more steps (run A); then a fresh process's view (run B):
  resume from the checkpoint and run the same two steps. B ends bit-equal to A, the EMA
  codebook statistics, usage record, LeCAM EMAs and params EMA included."""
  c = _config(codebook_dim=4, codebook_l2_norm=True, ema_decay=0.9, restart_window=2)
  c.loss.update(adaptive_weight=False, disc_weight=0.1, lecam_weight=0.1, r1_weight=1.0)
  c.train.update(params_ema_decay=0.9, usage_window=3)
  validate.validate_stage1(c)
  models = _models(c)
  state0 = _init(c, models)
  assert set(stage1.OPTIONAL_KEYS) <= set(state0)
  lp = {'w': np.ones((), np.float32)}
  abstract = jax.eval_shape(lambda: state0)
  sh = parallel.state_shardings(abstract, mesh1, parallel.axis_rules(c))
  lp_sh = jax.tree.map(lambda _: parallel.replicated(mesh1), lp)
  step_fn = stage1.make_train_step(c, models, mesh1, sh, lp_sh)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 256, (BATCH, SIZE, SIZE, 3)).astype(np.uint8) for _ in range(4)]

  state = jax.device_put(state0, sh)
  with checkpoints.Checkpointer(tmp_path, save_every=2) as ckpt:
    for i, images in enumerate(batches):
      state, metrics = step_fn(state, lp, images)
      ckpt.save(i + 1, state, None, c)
      if i == 1:
        at_2 = _host(state)
  final_a, metrics_a = _host(state), _host(metrics)
  assert metrics_a['lecam_reg'] > 0 and metrics_a['r1_penalty'] > 0
  assert metrics_a['d_weight'] == pytest.approx(0.1)
  # The EMA codebook is what params hold; the params EMA moved towards the params.
  stats = final_a['quantizer']['quantize']
  np.testing.assert_allclose(
    final_a['params']['quantize']['embedding']['embedding'],
    Q.ema_codebook(stats['ema_count'], stats['ema_sum'], stage1.EMA_EPS),
    rtol=1e-4,
  )
  kernel = lambda p: p['encoder']['conv_in']['kernel']
  assert not np.array_equal(kernel(final_a['params_ema']), kernel(final_a['params']))

  # "Kill": keep only the checkpoint of step 2 (A saved 2 and 4); resume in a new Checkpointer.
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.rmtree(tmp_path / 'checkpoints' / '4')
  with checkpoints.Checkpointer(tmp_path, save_every=2) as ckpt:
    setup = (abstract, sh, lambda: pytest.fail('resume found no checkpoint'))
    state, resumed = vqgan_trainer._resume(ckpt, c, models, mesh1, setup, _Iterator())
  assert resumed and int(state['step']) == 2
  _assert_equal_trees(state, at_2)
  for images in batches[2:]:
    state, metrics = step_fn(state, lp, images)
  _assert_equal_trees(state, final_a)


def test_old_workdir_resumes_as_vq(tmp_path, mesh1):
  """A checkpoint written before these fields existed (its config without them, its state
  without the new entries) resumes under today's config as the original's 'vq' model; the
  entries today's config adds (usage record, params EMA) start fresh."""
  c = _config()
  c.train.params_ema_decay = 0.99
  models = _models(c)
  # Values do not matter here, only that they come back: random arrays, nothing compiled.
  abstract = jax.eval_shape(
    lambda r: stage1.init_state(c, models, r, optional=()), jax.random.PRNGKey(0)
  )
  rng = np.random.default_rng(0)
  old_state = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype), abstract)
  old_state.update(step=np.asarray(5, np.int32), rng=np.asarray([0, 3], np.uint32))
  old_config = run_config.config_to_dict(c)
  for name in ('codebook_dim', 'codebook_l2_norm', 'ema_decay', 'restart_window'):
    del old_config['model'][name]
  for name in ('fsq_levels', 'lfq_bits', 'quantizer', 'kl_weight', 'temperature'):
    del old_config['model'][name]
  for name in ('adaptive_weight', 'lecam_weight', 'lecam_decay', 'r1_weight'):
    del old_config['loss'][name]
  for name in ('weight', 'temperature', 'anneal_steps', 'anneal_factor'):
    del old_config['loss'][f'entropy_{name}']
  for name in ('params_ema_decay', 'usage_window', 'usage_warning'):
    del old_config['train'][name]
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, old_state, None, old_config, force=True)

  assert vqgan_lib.from_config(run_config.upgrade_config(old_config)['model']).quantizer == 'vq'
  setup = stage1.state_setup(c, models, mesh1, jax.random.PRNGKey(0))
  assert set(setup[0]) - set(old_state) == {'code_last_used', 'params_ema'}
  with checkpoints.Checkpointer(tmp_path) as ckpt:
    state, resumed = vqgan_trainer._resume(ckpt, c, models, mesh1, setup, _Iterator())
  state = _host(state)
  assert resumed and int(state['step']) == 5
  np.testing.assert_array_equal(state['code_last_used'], np.zeros(c.model.n_embed))
  for a, b, e in zip(
    jax.tree.leaves(state['params']),
    jax.tree.leaves(old_state['params']),
    jax.tree.leaves(state['params_ema']),
  ):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(e, b)


def test_usage_warning_is_one_line_after_a_whole_window(capsys):
  c = _config()
  c.train.update(usage_window=3, usage_warning=0.5)
  health = vqgan_trainer._CodebookHealth(c, start=0)
  step = health.counted(lambda: None)
  m = dict(images_per_s=1.0, rec_loss=0, p_loss=0, quant_loss=0, disc_loss=0, perplexity=2.0)
  m.update(codebook_usage=0.2, window_usage=0.1)
  for _ in range(2):  # below the threshold, but the window has not run whole yet
    step()
    assert health.postfix(m)['use'] == '10%'
  assert capsys.readouterr().out == ''
  for _ in range(3):
    step()
    health.postfix(m)
  out = capsys.readouterr().out
  assert out.count('\n') == 1 and 'step 3' in out and 'config.train.usage_warning=0.5' in out
