"""bf16 compute for stage 1: how far it may move the losses, one update and the codes.

`config.train.dtype='bfloat16'` runs the convs and attention on bf16 operands with float32
accumulation (parameters, optimizer state, norms' statistics, quantizer and losses stay
float32). These tests bound the difference to the float32 step from the same state.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import config_base
from vqgan_jax.kernels import conv
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.models.quantizer import codebook_distances
from vqgan_jax.train import stage1

BATCH, SIZE = 4, 16
# Relative tolerance of every loss term and d_weight (measured: < 1%).
LOSS_RTOL = 3e-2
# Relative tolerance of the global gradient norms (measured: AE 3.9%, D 0.9%): the bf16
# backward rounds every cotangent to 8 bits of mantissa.
GRAD_NORM_RTOL = 8e-2
# Absolute tolerance of the mean logits and g_loss (measured: ~1e-3 at logits ~1e-2).
LOGIT_ATOL = 5e-3
# Cosine similarity of the bf16 and float32 gradients of one step, per network, and the
# fraction of parameters whose first update has the same sign (measured by the test run).
GRAD_COS = 0.95  # measured: AE 0.971, D above it
UPDATE_SIGN_AGREE = 0.9


def _config(dtype):
  c = config_base.stage1_base()
  c.model.update(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    resolution=SIZE,
    z_channels=32,
    n_embed=64,
    embed_dim=16,
  )
  c.loss.update(disc_start=0, disc_ndf=16, disc_num_layers=2, lpips_dropout=False)
  c.data.image_size = SIZE
  c.train.update(batch_size=BATCH, num_steps=10, dtype=dtype)
  return c


@pytest.fixture(scope='module')
def steps():
  """{dtype: (models, new_state, metrics)} of one step from the same float32-initialised state."""
  images = jnp.asarray(np.random.RandomState(0).randint(0, 256, (BATCH, SIZE, SIZE, 3)), jnp.uint8)
  lpips_params = lpips_lib.load_pretrained_params()
  state = stage1.init_state(
    _config('float32'), stage1.build_models(_config('float32')), jax.random.PRNGKey(0)
  )
  out = {}
  for dtype in ('float32', 'bfloat16'):
    config = _config(dtype)
    models = stage1.build_models(config)
    step = jax.jit(functools.partial(stage1.train_step, config, models, 0))
    new_state, metrics = step(state, lpips_params, images)
    out[dtype] = (models, jax.device_get(new_state), jax.device_get(metrics))
  return state, images, out


def test_losses_within_tolerance(steps):
  _, _, out = steps
  m32, m16 = out['float32'][2], out['bfloat16'][2]
  report = {k: (float(m32[k]), float(m16[k])) for k in m32}
  for k in ('total_loss', 'nll_loss', 'rec_loss', 'p_loss', 'quant_loss', 'd_weight', 'disc_loss'):
    assert m16[k].dtype == np.float32, k
    np.testing.assert_allclose(m16[k], m32[k], rtol=LOSS_RTOL, err_msg=f'{k}: {report}')
  for k in ('ae_grad_norm', 'disc_grad_norm'):
    np.testing.assert_allclose(m16[k], m32[k], rtol=GRAD_NORM_RTOL, err_msg=f'{k}: {report}')
  # Means of logits near zero (random D): an absolute tolerance on the logit scale.
  for k in ('g_loss', 'logits_real', 'logits_fake'):
    np.testing.assert_allclose(m16[k], m32[k], atol=LOGIT_ATOL, err_msg=f'{k}: {report}')


def _mu(opt_state):
  """Adam's first moment: after one step (1 - b1) times the gradient."""
  leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  return np.concatenate([np.ravel(x) for p, x in leaves if 'mu' in jax.tree_util.keystr(p)])


def test_one_update_within_tolerance(steps):
  state, _, out = steps
  s32, s16 = out['float32'][1], out['bfloat16'][1]
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  for key, opt in (('params', 'opt_state'), ('disc_params', 'disc_opt_state')):
    # The state stays float32 in bf16 compute.
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16[key]))
    g32, g16 = _mu(s32[opt]), _mu(s16[opt])
    cos = g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16))
    assert cos > GRAD_COS, (key, cos)
    # Adam's first update is lr * g / (|g| + eps), about lr * sign(g): it differs where a
    # gradient entry is small enough for bf16 to flip its sign. Those entries are rare.
    u32 = flat(s32[key]) - flat(state[key])
    u16 = flat(s16[key]) - flat(state[key])
    assert np.mean(np.sign(u32) == np.sign(u16)) > UPDATE_SIGN_AGREE, key


def test_codes_agree_except_near_ties(steps):
  state, images, out = steps
  params = state['params']
  x = stage1.to_model_range(images)
  pre_quant = lambda m, x: m.quant_conv(m.encoder(x))
  z32 = out['float32'][0].vqgan.apply({'params': params}, x, method=pre_quant)
  z16 = out['bfloat16'][0].vqgan.apply({'params': params}, x, method=pre_quant)
  assert z16.dtype == jnp.float32  # the quantizer sees float32 (accumulated) activations
  idx16 = out['bfloat16'][0].vqgan.apply({'params': params}, x, method='encode_to_indices')
  codebook = params['quantize']['embedding']['embedding']
  d = np.asarray(codebook_distances(z32, codebook)).reshape(-1, codebook.shape[0])
  best = d.argmin(-1)
  # Moving z by dz changes d_j - d_best by -2 dz.(e_j - e_best): code j can overtake the best
  # only if d_j - d_best <= 2 |dz| |e_j - e_best|. Those positions are the near-ties.
  dz = np.linalg.norm(np.asarray(z16 - z32).reshape(-1, z32.shape[-1]), axis=-1)
  e = np.asarray(codebook)
  reach = 2 * dz[:, None] * np.linalg.norm(e[None] - e[best][:, None], axis=-1) + 1e-5
  margin = d - d[np.arange(len(d)), best][:, None]
  np.put_along_axis(margin, best[:, None], np.inf, axis=-1)
  tie = (margin <= reach).any(-1)
  assert tie.mean() < 0.25, tie.mean()  # the check below must cover most positions
  np.testing.assert_array_equal(np.asarray(idx16).reshape(-1)[~tie], best[~tie])


def test_mixed_conv_backward_runs_in_bf16():
  """Both backward convs take bf16 operands (plain autodiff would promote them to float32)."""
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
  k = jnp.ones((3, 3, 4, 5), jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  loss = lambda x, k: jnp.sum(conv.mixed_conv(x, k, 1, pad) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, k)

  def convs(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        yield eqn
      for p in eqn.params.values():
        sub = getattr(p, 'jaxpr', p)
        if hasattr(sub, 'eqns'):
          yield from convs(sub)

  found = list(convs(jaxpr.jaxpr))
  assert len(found) >= 3  # forward, input and kernel gradients
  assert all(v.aval.dtype == jnp.bfloat16 for eqn in found for v in eqn.invars)
  gx, gk = jax.grad(loss, (0, 1))(x, k)
  rx, rk = jax.grad(loss, (0, 1))(x.astype(jnp.float32), k.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(gx, np.float32), rx, rtol=1e-2)
  np.testing.assert_allclose(np.asarray(gk, np.float32), rk, rtol=1e-2)
