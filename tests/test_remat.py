"""Rematerialisation: stage 1's per-block nn.remat keeps the parameter tree and the gradients
and really recomputes; both stages read it from the config."""

import contextlib
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common_transformer
from configs import fashion_mnist_vqgan
from vqgan_jax import validate
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.models import transformer as gpt_lib
from vqgan_jax.models.vqgan import VQGAN
from vqgan_jax.train import stage1
from vqgan_jax.train import stage2_config

SIZE = 16


def _vqgan(policy=None, dropout=0.0):
  # attention at 8x8 (level 1) and in the mid block: both block kinds are wrapped.
  return VQGAN(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    resolution=SIZE,
    z_channels=16,
    n_embed=32,
    embed_dim=8,
    dropout=dropout,
    remat_policy=policy,
  )


def _images(b=2):
  return jax.random.uniform(jax.random.PRNGKey(1), (b, SIZE, SIZE, 3), jnp.float32, -1, 1)


def _paths(tree):
  return [
    (jax.tree_util.keystr(p), x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def _params(model, x):
  """Random params without compiling an init (threefry's init compiles slowly on CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])['params']
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.randn(*s.shape), s.dtype), shapes)


def _loss(model, params, x):
  xrec, qloss, _ = model.apply({'params': params}, x)
  return jnp.mean(jnp.abs(x - xrec)) + qloss


def test_parameter_tree_is_the_same_with_remat():
  x = _images(1)
  init = lambda m: jax.eval_shape(m.init, jax.random.PRNGKey(0), x)['params']
  plain = _paths(init(_vqgan()))
  assert any('attn_0' in p for p, _ in plain) and any('mid' in p for p, _ in plain)
  for policy in ('nothing_saveable', 'dots_saveable'):
    assert _paths(init(_vqgan(policy))) == plain, policy


def test_remat_gradients_equal_and_forward_recomputed():
  x = _images()
  params = _params(_vqgan(), x)
  grad, convs = {}, {}
  for policy in (None, 'nothing_saveable'):
    fn = jax.jit(jax.grad(lambda p, m=_vqgan(policy): _loss(m, p, x)))
    compiled = fn.lower(params).compile()
    convs[policy] = compiled.as_text().count(' convolution(')
    grad[policy] = compiled(params)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grad[None]))
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(grad[None])[0], jax.tree.leaves(grad['nothing_saveable'])
  ):
    np.testing.assert_allclose(
      b, a, rtol=1e-5, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path)
    )
  # The blocks' forward convolutions run again in the backward pass (XLA's CSE did not undo
  # the recomputation). (XLA:CPU's scheduler does not turn unrolled remat into lower
  # temp memory; the memory effect is a property of the accelerator schedulers.)
  assert convs['nothing_saveable'] > convs[None], convs


def test_remat_with_dropout_traces():
  """`deterministic` is a static argument of the rematerialised ResnetBlock."""
  model = _vqgan('dots_saveable', dropout=0.1)
  x = _images(2)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])['params']
  out = jax.eval_shape(
    jax.grad(
      lambda p: jnp.mean(
        model.apply({'params': p}, x, False, rngs={'dropout': jax.random.PRNGKey(2)})[0]
      )
    ),
    params,
  )
  assert _paths(out) == _paths(params)


def test_config_fields():
  c = fashion_mnist_vqgan.get_config('smoke')
  assert (c.train.remat, c.train.remat_policy) == ('none', 'nothing_saveable')
  assert stage1.build_models(c).vqgan.remat_policy is None
  c.train.update(remat='block', remat_policy='dots_saveable')
  validate.validate_stage1(c)
  assert stage1.build_models(c).vqgan.remat_policy == 'dots_saveable'
  for field, value in (('remat', 'full'), ('remat_policy', 'save_anything')):
    bad = c.copy_and_resolve_references()
    bad.train[field] = value
    with pytest.raises(validate.ConfigError, match=rf'config\.train\.{field}'):
      validate.validate_stage1(bad)

  t = common_transformer.stage2_base().transformer
  assert (t.remat, t.remat_policy) == ('none', 'nothing_saveable')
  cases = {
    ('none', 'dots_saveable'): False,
    ('', 'dots_saveable'): False,
    ('full', 'dots_saveable'): True,
    ('block', 'nothing_saveable'): True,
    ('block', 'dots_saveable'): 'dots_saveable',
    ('dots_with_no_batch_dims_saveable', 'nothing_saveable'): 'dots_with_no_batch_dims_saveable',
  }
  for (remat, policy), want in cases.items():
    t.update(remat=remat, remat_policy=policy)
    assert stage2_config.gpt_remat(t) == want, (remat, policy)


def test_stage1_step_traces_with_remat():
  """The fused stage-1 step (VJPs through encode / decode_with_features) under remat: same
  state structure out as in (traced only; nothing compiled)."""
  c = fashion_mnist_vqgan.get_config('smoke')
  c.train.update(remat='block', remat_policy='dots_saveable')
  models = stage1.build_models(c)
  state = jax.eval_shape(functools.partial(stage1.init_state, c, models), jax.random.PRNGKey(0))
  lp = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), lpips_lib.load_pretrained_params()
  )
  images = jax.ShapeDtypeStruct((2, c.data.image_size, c.data.image_size, 3), jnp.uint8)
  new_state, metrics = jax.eval_shape(
    functools.partial(stage1.train_step, c, models, 0), state, lp, images
  )
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert metrics['total_loss'].shape == ()


def test_gpt_dot_policies_save_dots_in_bf16_too():
  """The dot-saving policies save the same GPT dot outputs in bf16 as in float32, although
  bf16's dots sit inside `mixed_einsum`'s custom VJP, invisible to the policies' primitive
  test: the weight matmuls for `dots_with_no_batch_dims_saveable`, attention's too for
  `dots_saveable`."""
  tokens = jnp.zeros((2, 16), jnp.int32)

  def saved(dtype, policy):  # shapes of what the scanned blocks save for the backward
    model = gpt_lib.GPT(
      40, 16, n_layer=2, n_head=2, n_embd=32, dtype=jnp.dtype(dtype), remat=policy, scan_layers=True
    )
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      jax.ad_checkpoint.print_saved_residuals(lambda p: model.apply(p, tokens).sum(), params)
    return sorted(l.split()[0] for l in out.getvalue().splitlines() if 'output of scan' in l)

  stream = 'f32[2,2,16,32]'  # each layer's input (2 layers, batch 2, 16 tokens, 32 wide)
  for dtype in ('float32', 'bfloat16'):
    assert saved(dtype, True) == [stream], dtype
    weights = saved(dtype, 'dots_with_no_batch_dims_saveable')
    assert 'f32[2,2,16,128]' in weights and len(weights) >= 5, (dtype, weights)  # mlp_0, ...
    every = saved(dtype, 'dots_saveable')
    assert every.count('f32[2,2,2,16,16]') == 2 and set(weights) <= set(every), (dtype, every)
    if dtype == 'float32':
      want = (weights, every)
    else:
      assert (weights, every) == want
