"""GPT: causality, KV-cache decode, layouts, sharding, and parity with the original minGPT."""

import functools
import math

import bounds
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import parallel
from vqgan_jax.convert import param_mapping
from vqgan_jax.models import transformer as gpt_lib

V, BLOCK, LAYERS, HEADS, C = 33, 24, 2, 2, 32


@pytest.fixture(scope='module')
def model():
  return gpt_lib.GPT(V, BLOCK, LAYERS, HEADS, C)


@functools.partial(jax.jit, static_argnums=0)
def _random_params(model, seed=0):
  """Init params with every leaf perturbed (pos_emb, biases and LN are 0/1 at init)."""
  key, noise = jax.random.split(jax.random.key(seed))
  p = nn.unbox(model.init(key, jnp.zeros((1, BLOCK), jnp.int32)))['params']
  leaves, treedef = jax.tree.flatten(p)
  keys = jax.random.split(noise, len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope='module')
def params(model):
  return _random_params(model)


def _apply(model, *args, **kw):
  return jax.jit(model.apply, static_argnames=('deterministic',))(*args, **kw)


def _tokens(seed, shape=(2, BLOCK)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


def _expected_torch_shapes(n_layer=LAYERS):
  shapes = {
    'tok_emb.weight': (V, C),
    'pos_emb': (1, BLOCK, C),
    'ln_f.weight': (C,),
    'ln_f.bias': (C,),
    'head.weight': (V, C),
  }
  for l in range(n_layer):
    b = f'blocks.{l}'
    for ln in ('ln1', 'ln2'):
      shapes[f'{b}.{ln}.weight'] = shapes[f'{b}.{ln}.bias'] = (C,)
    for n in ('key', 'query', 'value', 'proj'):
      shapes[f'{b}.attn.{n}.weight'], shapes[f'{b}.attn.{n}.bias'] = (C, C), (C,)
    shapes[f'{b}.mlp.0.weight'], shapes[f'{b}.mlp.0.bias'] = (4 * C, C), (4 * C,)
    shapes[f'{b}.mlp.2.weight'], shapes[f'{b}.mlp.2.bias'] = (C, 4 * C), (C,)
  return shapes


def test_init_values_and_names(model):
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  p = nn.unbox(variables)['params']
  assert not np.any(p['pos_emb'])
  assert abs(float(jnp.std(p['blocks_0']['mlp_0']['kernel'])) - 0.02) < 0.003
  assert not np.any(p['blocks_1']['attn']['query']['bias'])
  assert np.all(p['ln_f']['scale'] == 1) and 'bias' not in p['head']
  # Every parameter carries logical axes.
  boxed = jax.tree.leaves(
    variables['params'], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
  names = nn.get_partition_spec(variables)['params']
  assert tuple(names['blocks_0']['attn']['query']['kernel']) == ('embed', 'heads')
  assert tuple(names['blocks_0']['mlp_2']['kernel']) == ('mlp', 'embed')
  assert tuple(names['head']['kernel']) == ('embed', 'vocab')
  assert tuple(names['tok_emb']['embedding']) == ('vocab', 'embed')


def test_param_names_map_onto_original_keys(params):
  """The full key set (minus the attn.mask buffers) with the original shapes, both ways."""
  sd = param_mapping.gpt_to_torch_state_dict(params)
  assert {k: v.shape for k, v in sd.items()} == _expected_torch_shapes()
  back = param_mapping.gpt_from_torch_state_dict(
    {f'transformer.{k}': v for k, v in sd.items()}, LAYERS
  )
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  with pytest.raises(ValueError, match='not mapped'):
    param_mapping.gpt_from_torch_state_dict(sd, LAYERS - 1)


def test_causality(model, params):
  tokens = _tokens(1)
  base = _apply(model, {'params': params}, tokens)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % V)
  out = _apply(model, {'params': params}, changed)
  np.testing.assert_array_equal(out[:, :10], base[:, :10])
  assert float(jnp.abs(out[:, 10:] - base[:, 10:]).max()) > 1e-3


def test_kv_cache_decode_matches_full_forward(model, params):
  tokens = _tokens(2, (3, BLOCK))
  full = _apply(model, {'params': params}, tokens)
  decode = jax.jit(
    lambda t, c, pos: model.apply({'params': params}, t, c, pos, method=model.decode)
  )
  # Stale cache contents beyond pos must not matter: start from garbage.
  cache = jax.tree.map(lambda x: x + 7.0, model.init_cache(3, BLOCK))
  prefill = 5
  logits, cache = decode(tokens[:, :prefill], cache, 0)
  np.testing.assert_allclose(logits, full[:, :prefill], atol=1e-5, rtol=0)
  for t in range(prefill, BLOCK):
    logits, cache = decode(tokens[:, t : t + 1], cache, t)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
  # logits_at picks one position without running the head elsewhere.
  one, _ = jax.jit(functools.partial(model.apply, method=model.decode))(
    {'params': params}, tokens[:, :9], model.init_cache(3, BLOCK), 0, 6
  )
  np.testing.assert_allclose(one, full[:, 6], atol=1e-5, rtol=0)


def test_scan_layout_and_remat_match(model, params):
  tokens = _tokens(3)
  ref = _apply(model, {'params': params}, tokens)
  scanned = model.clone(scan_layers=True, remat='dots_with_no_batch_dims_saveable')
  stacked = gpt_lib.stack_layers({'params': params})
  init_shapes = jax.eval_shape(scanned.init, jax.random.key(0), tokens)
  assert jax.tree.map(lambda x: x.shape, nn.unbox(init_shapes)) == jax.tree.map(
    lambda x: x.shape, stacked
  )
  np.testing.assert_allclose(_apply(scanned, stacked, tokens), ref, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, gpt_lib.unstack_layers(stacked), {'params': params})

  def loss(m, p):
    return jnp.mean(m.apply(p, tokens) ** 2)

  g_ref = jax.jit(jax.grad(lambda p: loss(model.clone(remat=True), p)))({'params': params})
  g_scan = gpt_lib.unstack_layers(jax.jit(jax.grad(lambda p: loss(scanned, p)))(stacked))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_scan, g_ref)


def test_dropout_and_bf16(model, params):
  tokens = _tokens(4)
  ref = _apply(model, {'params': params}, tokens)
  drop = model.clone(embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
  np.testing.assert_allclose(_apply(drop, {'params': params}, tokens), ref, atol=1e-6)
  noisy = _apply(
    drop, {'params': params}, tokens, deterministic=False, rngs={'dropout': jax.random.key(0)}
  )
  assert float(jnp.abs(noisy - ref).max()) > 1e-3
  low = _apply(model.clone(dtype=jnp.bfloat16), {'params': params}, tokens)
  assert low.dtype == jnp.float32
  assert float(jnp.abs(low - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def _dot_operand_dtypes(fn, *args):
  """dtypes of the operands of every dot_general in fn's jaxpr (nested jaxprs included)."""
  out = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


def test_bf16_backward_stays_in_bf16(model, params):
  """In bf16 every dot of the training gradient, backward included, takes bf16 operands
  (a float32 cotangent would otherwise promote the backward dots to float32 speed), and the
  loss and gradients stay close to float32's."""
  tokens = _tokens(7)

  def loss(p, m):
    logits = m.apply({'params': p}, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  low = model.clone(dtype=jnp.bfloat16)
  dtypes = _dot_operand_dtypes(jax.grad(functools.partial(loss, m=low)), params)
  # Per layer: 6 Dense + 2 attention dots, each with 1 forward and 2 backward dots; head too.
  assert len(dtypes) == 3 * (8 * LAYERS + 1)
  assert set(dtypes) == {('bfloat16', 'bfloat16')}, set(dtypes)
  assert {('float32', 'float32')} == set(
    _dot_operand_dtypes(jax.grad(functools.partial(loss, m=model)), params)
  )

  (l32, g32), (l16, g16) = (
    jax.jit(jax.value_and_grad(functools.partial(loss, m=m)))(params) for m in (model, low)
  )
  assert abs(float(l16) - float(l32)) < 1e-2 * abs(float(l32))
  overall = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g32))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g16)):
    # The key bias's true gradient is 0 (softmax ignores a shift): floor the scale.
    scale = max(float(jnp.abs(a).max()), 1e-2 * overall)
    bounds.check(jax.tree_util.keystr(path), float(jnp.abs(a - b).max()) / scale, 0.05)


def test_mixed_einsum_gradients():
  rng = np.random.RandomState(0)
  for spec, sa, sb in [
    ('...i,io->...o', (4, 5, 16), (16, 8)),
    ('bhqd,bhkd->bhqk', (2, 3, 5, 8), (2, 3, 6, 8)),
    ('bhqk,bhkd->bhqd', (2, 3, 5, 6), (2, 3, 6, 8)),
  ]:
    a, b = (jnp.asarray(rng.randn(*s), jnp.float32) for s in (sa, sb))
    w = jnp.asarray(rng.randn(*jnp.einsum(spec, a, b).shape), jnp.float32)
    ref = jax.grad(lambda a, b: jnp.sum(w * jnp.einsum(spec, a, b)), (0, 1))(a, b)
    got = jax.grad(
      lambda a, b: jnp.sum(
        w * gpt_lib.mixed_einsum(spec, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
      ),
      (0, 1),
    )(a, b)
    for r, g in zip(ref, got):
      assert g.dtype == jnp.float32
      err = float(jnp.abs(r - g).max() / jnp.abs(r).max())
      assert 1e-5 < err < 1e-2, (spec, err)  # bf16 rounding, not a different function


def test_sharded_forward_matches(model):
  mesh = jax.make_mesh(
    (2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  tokens = _tokens(5, (4, BLOCK))
  variables = jax.jit(model.init)(jax.random.key(0), tokens)
  shardings = parallel.logical_shardings(variables, mesh)
  spec = shardings['params']['blocks_0']['mlp_0']['kernel'].spec
  assert tuple(spec) == ('fsdp', 'tensor')
  assert tuple(shardings['params']['head']['kernel'].spec) == ('fsdp', None)  # 33 % 2 != 0
  # A mesh without 'tensor' (parallel.py's) drops that axis.
  mesh2 = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert tuple(
    parallel.logical_shardings(variables, mesh2)['params']['blocks_0']['mlp_0']['kernel'].spec
  ) == ('fsdp', None)
  plain = nn.unbox(variables)
  sharded = jax.device_put(plain, shardings)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  with nn.logical_axis_rules(parallel.mesh_rules(mesh)), jax.set_mesh(mesh):
    out = jax.jit(model.apply)(sharded, jax.device_put(tokens, batch))
  np.testing.assert_allclose(out, _apply(model, plain, tokens), atol=1e-5)


def test_parity_with_original_mingpt(model):
  torch = pytest.importorskip('torch', reason='torch not installed ([reference] extra)')
  try:
    from vqgan_jax.testing import reference

    gpt = reference.build_gpt(V, BLOCK, LAYERS, HEADS, C, seed=0)
  except ImportError as e:
    pytest.skip(f'original taming-transformers not importable: {e}')
  with torch.no_grad():  # exercise pos_emb, biases and LN too (zero/one at init)
    gen = torch.Generator().manual_seed(1)
    for p in gpt.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  sd = {k: v.numpy() for k, v in gpt.state_dict().items()}
  assert set(sd) - set(_expected_torch_shapes()) == {f'blocks.{l}.attn.mask' for l in range(LAYERS)}
  params = param_mapping.gpt_from_torch_state_dict(sd, LAYERS)
  tokens = np.array(_tokens(6, (4, BLOCK)))
  gpt.eval()
  with torch.no_grad():
    want = gpt(torch.from_numpy(tokens).long())[0].numpy()
  got = np.asarray(_apply(model, {'params': params}, jnp.asarray(tokens)))
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f'parity vs original: max abs err {np.abs(got - want).max():.3g}, relative {err:.3g}')
  bounds.check('GPT logits vs the original (relative)', err, 1e-4)


def test_gelu_is_the_exact_gelu():
  """The erf form is x Phi(x) to float32 rounding (against float64's math.erf); bf16 stays
  bf16."""
  x = jnp.linspace(-12.0, 12.0, 100_001, dtype=jnp.float32)
  x64 = np.asarray(x, np.float64)
  want = 0.5 * x64 * (1.0 + np.vectorize(math.erf)(x64 / math.sqrt(2.0)))
  err = np.abs(np.asarray(gpt_lib.gelu(x), np.float64) - want)
  # float32 rounding: erf within 4 ulp of its value (|erf| <= 1: 4u absolute) plus the
  # rounded argument x/sqrt(2) (|d erf| <= 0.8 u |x|), 1 + erf rounded (u), times 0.5 x:
  # <= 0.5 |x| (4 + 0.8 + 1) u, rounded up to 4 u |x|; the product's own rounding 2 u |y|.
  u = 2.0**-24
  bounds.check(
    'gelu vs float64 (of its rounding envelope)',
    float(np.max(err / (u * (4 * np.abs(x64) + 2 * np.abs(want)) + 1e-30))),
    1.0,
  )
  assert gpt_lib.gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
