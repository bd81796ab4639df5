"""Stage 2: loss masking, pkeep, the weight-decay mask, vocabulary layouts, the sharded step,
held-out NLL over a whole split, spatial conditioning, and the stage-1 -> encode -> stage-2
-> sample handoff through `python -m vqgan_jax.main` of a non-editable install, and the
README's Python example."""

import functools
import importlib
import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist_transformer
from vqgan_jax import checkpoints
from vqgan_jax import config_base
from vqgan_jax import encode as codes_lib
from vqgan_jax import inference
from vqgan_jax import parallel
from vqgan_jax.data import tokens
from vqgan_jax.models import vqgan as vqgan_lib
from vqgan_jax.train import common
from vqgan_jax.train import stage2
from vqgan_jax.train import stage2_config
from vqgan_jax.train import transformer_trainer
from vqgan_jax.validate import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(kind='class', **transformer):
  """A stage-2 config over an 8x8 code grid of 32 codes (no checkpoint needed)."""
  c = fashion_mnist_transformer.get_config('smoke')
  c.stage1_workdir = ''
  c.stage1_config.update(ch_mult=(1, 2, 2, 2), n_embed=32)  # f8: 64 -> 8x8
  c.data.image_size = 64
  c.cond.kind = kind
  c.cond.n_classes = 5 if kind == 'class' else 0
  c.transformer.update(n_layer=2, n_head=2, n_embd=32, **transformer)
  c.train.update(batch_size=8, eval_batch_size=4)
  c.optim.update(warmup_steps=0, schedule='constant', base_lr=1e-4)
  return c  # vocab_size / block_size stay -1: derived by make_layout


def _random_batch(layout, b, seed=0):
  rng = np.random.RandomState(seed)
  batch = {
    'codes': rng.randint(0, layout.n_image, (b, layout.image_len)).astype(np.int32),
    'label': rng.randint(0, max(layout.n_classes, 1), (b,)).astype(np.int32),
  }
  if layout.kind == 'spatial':
    batch['cond_codes'] = rng.randint(0, layout.cond_n_embed, (b, layout.cond_len)).astype(np.int32)
  return batch


# ----------------------------------------------------------------------------------------
# Loss masking, pkeep, weight decay
# ----------------------------------------------------------------------------------------


def test_loss_scores_only_image_positions():
  b, lc, l, n_image, vocab = 3, 4, 6, 10, 15
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(b, lc + l - 1, vocab), jnp.float32)
  codes = jnp.asarray(rng.randint(0, n_image, (b, l)), jnp.int32)
  nll = stage2.image_token_nll(logits, codes, lc, n_image)
  # By hand: output lc - 1 + i predicts code i, softmax over the image codes only.
  lg = np.asarray(logits)[:, lc - 1 :, :n_image].astype(np.float64)
  ref = (
    np.log(np.exp(lg).sum(-1)) - np.take_along_axis(lg, np.asarray(codes)[..., None], -1)[..., 0]
  )
  np.testing.assert_allclose(np.asarray(nll), ref, rtol=1e-5)
  # Anything at the condition positions (their outputs would predict condition tokens)
  # changes nothing: other logits there, and no gradient reaches them.
  other = logits.at[:, : lc - 1].set(jnp.asarray(rng.randn(b, lc - 1, vocab) * 50))
  np.testing.assert_array_equal(
    np.asarray(stage2.image_token_nll(other, codes, lc, n_image)), np.asarray(nll)
  )
  grad = jax.grad(lambda x: stage2.image_token_nll(x, codes, lc, n_image).mean())(logits)
  assert not np.any(np.asarray(grad)[:, : lc - 1])
  assert not np.any(np.asarray(grad)[..., n_image:])  # condition ids are never predicted
  assert np.all(np.abs(np.asarray(grad)[:, lc - 1 :, :n_image]).sum(-1) > 0)
  # Changing an image target changes the loss.
  changed = codes.at[0, 2].set((codes[0, 2] + 1) % n_image)
  assert not np.allclose(
    np.asarray(stage2.image_token_nll(logits, changed, lc, n_image)), np.asarray(nll)
  )


def test_pkeep():
  codes = jax.random.randint(jax.random.PRNGKey(1), (64, 256), 0, 1000)
  key = jax.random.PRNGKey(2)
  np.testing.assert_array_equal(
    np.asarray(stage2.corrupt(key, codes, 1.0, 1000)), np.asarray(codes)
  )
  noisy = np.asarray(stage2.corrupt(key, codes, 0.0, 1000))
  assert noisy.min() >= 0 and noisy.max() < 1000
  assert np.mean(noisy == np.asarray(codes)) < 0.01  # all random (1/1000 by chance)
  for pkeep in (0.3, 0.8):
    kept = np.mean(np.asarray(stage2.corrupt(key, codes, pkeep, 1000)) == np.asarray(codes))
    assert abs(kept - (pkeep + (1 - pkeep) / 1000)) < 0.01, (pkeep, kept)

  # In the step the inputs are corrupted, the targets stay clean, and the loss is the mean
  # image-code NLL of the model on those inputs.
  config = tiny_config('class', pkeep=0.0)
  layout = stage2_config.make_layout(config)
  model = stage2_config.build_model(config, layout)
  tx, schedule = stage2.make_optimizer(config)
  state = jax.jit(functools.partial(stage2.init_state, model, tx))(jax.random.PRNGKey(0))
  state['params']['head']['kernel'] *= 30.0  # make the loss sensitive to the inputs
  batch = jax.tree.map(jnp.asarray, _random_batch(layout, 4))
  step = jax.jit(
    functools.partial(stage2.train_step, model, layout, tx, schedule, stage2.Frozen(), 0.0, 0.0)
  )
  _, metrics = step(state, {}, batch)
  # The step's keys: fold_in(rng, step) split into (cond, keep, dropout).
  k_keep = jax.random.split(jax.random.fold_in(state['rng'], 0), 3)[1]
  cond = stage2.cond_tokens(layout, batch)
  # The class is a token after the image codes (the offset convention).
  np.testing.assert_array_equal(np.asarray(cond)[:, 0], np.asarray(batch['label']) + layout.n_image)
  noisy = stage2.corrupt(k_keep, batch['codes'], 0.0, layout.n_image)
  assert np.mean(np.asarray(noisy) == np.asarray(batch['codes'])) < 0.2
  logits = jax.jit(model.apply)({'params': state['params']}, stage2.model_inputs(cond, noisy))
  clean_targets = jnp.mean(stage2.image_token_nll(logits, batch['codes'], 1, layout.n_image))
  noisy_targets = jnp.mean(stage2.image_token_nll(logits, noisy, 1, layout.n_image))
  np.testing.assert_allclose(float(metrics['loss']), float(clean_targets), rtol=1e-5)
  assert abs(float(noisy_targets) - float(clean_targets)) > 1e-3


@pytest.mark.parametrize('scan', [False, True])
def test_weight_decay_mask_covers_exactly_the_kernels(scan):
  config = tiny_config('class', scan_layers=scan)
  layout = stage2_config.make_layout(config)
  model = stage2_config.build_model(config, layout)
  params = jax.eval_shape(functools.partial(stage2.init_params, model), jax.random.PRNGKey(0))
  flat = {
    '/'.join(str(k.key) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(stage2.decay_mask(params))[0]
  }
  decayed = {p for p, v in flat.items() if v}
  prefix = 'blocks/' if scan else 'blocks_0/'
  expected_layer = {f'{prefix}attn/{n}/kernel' for n in ('key', 'query', 'value', 'proj')}
  expected_layer |= {f'{prefix}mlp_0/kernel', f'{prefix}mlp_2/kernel'}
  assert expected_layer <= decayed
  assert 'head/kernel' in decayed
  assert decayed == {p for p in flat if p.endswith('/kernel')}
  for p in (
    'tok_emb/embedding',
    'pos_emb',
    'ln_f/scale',
    'ln_f/bias',
    f'{prefix}ln1/scale',
    f'{prefix}ln2/bias',
    f'{prefix}attn/key/bias',
    f'{prefix}mlp_0/bias',
  ):
    assert not flat[p], p
  # AdamW with zero gradients moves exactly the decayed leaves, by lr * wd * p.
  tx, _ = stage2.make_optimizer(config)
  p = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), params)
  updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(p)
  lr = common.peak_learning_rate(config)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = '/'.join(str(k.key) for k in path)
    want = -lr * config.optim.weight_decay if name in decayed else 0.0
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------
# Vocabulary and configs
# ----------------------------------------------------------------------------------------


def test_vocabulary_conventions():
  lay = stage2_config.make_layout(tiny_config('class'))
  assert (lay.vocab_size, lay.cond_offset, lay.block_size) == (32 + 5, 32, 64)
  lay = stage2_config.make_layout(tiny_config('class', shared_vocab=True))
  assert (lay.vocab_size, lay.cond_offset) == (32, 0)
  lay = stage2_config.make_layout(tiny_config('unconditional'))
  assert (lay.vocab_size, lay.sos_id) == (33, 32)
  lay = stage2_config.make_layout(tiny_config('unconditional', shared_vocab=True))
  assert (lay.vocab_size, lay.sos_id) == (32, 0)
  c = tiny_config('class')
  c.cond.drop_prob = 0.1
  lay = stage2_config.make_layout(c)
  assert (lay.vocab_size, lay.null_id) == (32 + 5 + 1, 37)
  # Class dropout replaces the class token by the null id at drop_prob.
  labels = {'codes': jnp.zeros((4000, 1), jnp.int32), 'label': jnp.ones((4000,), jnp.int32)}
  ids = np.asarray(stage2.cond_tokens(lay, labels, jax.random.PRNGKey(0), 0.1))[:, 0]
  assert set(np.unique(ids)) == {33, 37} and abs(np.mean(ids == 37) - 0.1) < 0.02
  c.transformer.update(vocab_size=20)
  with pytest.raises(ConfigError, match='vocab_size'):
    stage2_config.make_layout(c)
  # The demo: 8x8 codes of 256 after a class token; 10 classes and the null class (guidance).
  demo = stage2_config.make_layout(
    stage2_config.resolve_config(fashion_mnist_transformer.get_config())
  )
  assert (demo.grid, demo.n_image, demo.vocab_size, demo.block_size) == ((8, 8), 256, 267, 64)


def test_class_tokens_refuse_classes_the_model_lacks():
  """From Python as from the CLI: a class id outside [0, n_classes) would index another
  token of the vocabulary (garbage codes), so it is one ValueError naming the ids."""
  lay = stage2_config.make_layout(tiny_config('class'))
  np.testing.assert_array_equal(stage2.class_tokens(lay, [0, 4]), [[32], [36]])
  for bad in ([5], [-1, 2]):
    with pytest.raises(ValueError, match=r'class ids \[(5|-1)\] are outside \[0, 5\)'):
      stage2.class_tokens(lay, bad)
  # Unconditional models take any labels (they become the start token).
  unc = stage2_config.make_layout(tiny_config('unconditional'))
  np.testing.assert_array_equal(stage2.class_tokens(unc, [7]), [[unc.sos_id]])


@pytest.mark.parametrize(
  'name,vocab,block,layers,heads,width,kind',
  [
    ('imagenet_cin_transformer', 16384, 256, 48, 24, 1536, 'class'),
    ('ffhq_transformer', 1024, 256, 24, 16, 1664, 'unconditional'),
    ('celebahq_transformer', 1024, 256, 24, 16, 1664, 'unconditional'),
    ('drin_transformer', 1024, 512, 24, 16, 1024, 'spatial'),
    ('sflckr_transformer', 1024, 512, 24, 16, 1024, 'spatial'),
  ],
)
def test_paper_configs(name, vocab, block, layers, heads, width, kind):
  module = importlib.import_module(f'configs.{name}')
  c = stage2_config.resolve_config(module.get_config())
  t = c.transformer
  assert (t.vocab_size, t.block_size, t.n_layer, t.n_head, t.n_embd, c.cond.kind) == (
    vocab,
    block,
    layers,
    heads,
    width,
    kind,
  )
  assert t.shared_vocab  # converted taming checkpoints load as they are
  smoke = stage2_config.resolve_config(module.get_config('smoke'))
  stage2_config.validate_config(smoke)
  assert smoke.transformer.n_layer <= 2 and smoke.train.num_steps <= 10


def test_stage1_fields_checked_against_the_checkpoint():
  fields = ml_collections.ConfigDict({'ch': 32, 'ch_mult': (1, 2), 'n_embed': 64})
  saved = {'stage': 'vqgan', 'model': {'ch': 32, 'ch_mult': [1, 2], 'n_embed': 64, 'embed_dim': 16}}
  stage2_config._merge_model_fields(fields, saved, 'config.stage1_config', 'A')  # pylint: disable=protected-access
  assert fields.embed_dim == 16  # filled from the checkpoint
  saved['model']['n_embed'] = 128
  with pytest.raises(ConfigError, match=r'config\.stage1_config\.n_embed=64'):
    stage2_config._merge_model_fields(fields, saved, 'config.stage1_config', 'A')  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------
# Sharding and evaluation
# ----------------------------------------------------------------------------------------


def _run_steps(config, layout, mesh, batches):
  model = stage2_config.build_model(config, layout)
  tx, schedule = stage2.make_optimizer(config)
  shardings = stage2.gpt_state_shardings(model, tx, mesh, rules=parallel.axis_rules(config))
  state = jax.jit(functools.partial(stage2.init_state, model, tx), out_shardings=shardings)(
    jax.random.PRNGKey(0)
  )
  born = jax.tree.map(lambda x: x.sharding, state)  # params are born sharded
  init = jax.tree.map(np.asarray, jax.device_get(state['params']))  # before donation
  step = stage2.make_train_step(config, model, layout, tx, schedule, mesh, shardings)
  losses = []
  for batch in batches:
    state, metrics = step(state, {}, jax.device_put(batch, parallel.batch_sharding(mesh)))
    losses.append(float(metrics['loss']))
  return (
    jax.tree.map(np.asarray, jax.device_get(state['params'])),
    losses,
    {'state': state, 'born': born, 'model': model, 'init_params': init},
  )


# The logical -> mesh axes the default table gives the GPT's parameters, written out.
GPT_AXES = {
  'embed': 'fsdp',
  'mlp': 'tensor',
  'heads': 'tensor',
  'vocab': 'tensor',
  'layers': None,
  None: None,
}


def _gpt_expected_specs(model, mesh):
  """Per parameter: the spec from its logical names and GPT_AXES (an axis that does not
  divide the dimension is dropped), computed without the library's rule code."""
  boxed = jax.eval_shape(
    functools.partial(stage2.init_params, model, boxed=True), jax.random.PRNGKey(0)
  )

  def one(leaf):
    spec = []
    for size, name in zip(leaf.value.shape, leaf.names):
      axis = GPT_AXES[name]
      spec.append(axis if axis and size % mesh.shape[axis] == 0 else None)
    return tuple(spec)

  return jax.tree.map(one, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def test_sharded_step_matches_single_device():
  config = tiny_config('class', pkeep=0.9)
  config.transformer.n_embd = 64  # 4C = 256 and C divisible by every mesh axis
  config.cond.n_classes = 8  # vocab 40: divisible by tensor=2
  layout = stage2_config.make_layout(config)
  batches = [_random_batch(layout, 8, seed) for seed in range(2)]
  single = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  config.mesh.update(data=2, fsdp=2, tensor=2)
  multi = parallel.make_mesh(config.mesh)
  assert dict(multi.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  p1, l1, _ = _run_steps(config, layout, single, batches)
  p8, l8, run = _run_steps(config, layout, multi, batches)
  state, want = run['state'], _gpt_expected_specs(run['model'], multi)
  params = jax.tree_util.tree_flatten_with_path(state['params'])[0]
  want = jax.tree.leaves(want, is_leaf=lambda t: isinstance(t, tuple))
  assert len(params) == len(want)
  specs = set()
  for (path, x), spec in zip(params, want):
    name = jax.tree_util.keystr(path)
    assert tuple(x.sharding.spec) == spec, name
    specs.add(spec)
    # Each device holds 1/(product of the used axes) of the array, replicated over the rest.
    used = [a for a in spec if a]
    assert (
      x.addressable_shards[0].data.size * int(np.prod([multi.shape[a] for a in used])) == x.size
    ), name
  # Every kind of placement occurs: (layers, embed, mlp), (layers, heads, embed), vocab, ...
  assert {
    (None, 'fsdp', 'tensor'),
    (None, 'tensor', 'fsdp'),
    ('fsdp', 'tensor'),
    ('tensor', 'fsdp'),
    (None, 'fsdp'),
  } <= specs, specs
  # Born sharded: the state came out of init with these shardings (not placed afterwards).
  for (path, x), born in zip(params, jax.tree.leaves(run['born']['params'])):
    assert born.is_equivalent_to(x.sharding, x.ndim), jax.tree_util.keystr(path)
  # AdamW's moments are sharded exactly like their parameters; its counters replicated.
  adam = state['opt_state'][0]
  for moments in (adam.mu, adam.nu):
    for (path, x), (_, m) in zip(params, jax.tree_util.tree_flatten_with_path(moments)[0]):
      assert tuple(m.sharding.spec) == tuple(x.sharding.spec), jax.tree_util.keystr(path)
  assert tuple(adam.count.sharding.spec) == ()
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  # Adam's first steps move every entry by about lr x sign(gradient): where a gradient is
  # within float noise of 0 its sign, and so a whole lr step, depends on the layout. The key
  # bias's gradient is exactly 0 (softmax ignores a shift shared by all keys), so all of it is
  # noise: it is only checked to stay within its lr bound. Elsewhere 99% of the entries must
  # agree to 10% of a step, and all within the bound; a sharding bug moves far more (and the
  # losses above).
  lr_steps = common.peak_learning_rate(config) * len(batches) * 1.01
  for (path, a), b, a0 in zip(
    jax.tree_util.tree_flatten_with_path(p1)[0],
    jax.tree.leaves(p8),
    jax.tree.leaves(run['init_params']),
  ):
    name = jax.tree_util.keystr(path)
    assert float(np.abs(b - a0).max()) <= lr_steps and float(np.abs(a - a0).max()) <= lr_steps
    if "['key']['bias']" in name:
      continue
    close = np.abs(b - a) <= 0.1 * lr_steps + 2e-4 * np.abs(a)
    assert close.mean() >= 0.99, (name, float(close.mean()))


def test_eval_nll_covers_the_whole_split():
  config = tiny_config('class')
  layout = stage2_config.make_layout(config)
  model = stage2_config.build_model(config, layout)
  params = jax.jit(functools.partial(stage2.init_params, model))(jax.random.PRNGKey(3))
  params['head']['kernel'] *= 20.0  # a non-uniform model
  data = _random_batch(layout, 7, seed=5)
  source = [
    {'codes': data['codes'][i].astype(np.uint16), 'label': data['label'][i], 'index': i}
    for i in range(7)
  ]
  mesh = parallel.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:2])
  eval_fn = stage2.make_eval_step(model, layout, mesh, stage2.param_shardings(model, mesh))
  batches = tokens.make_eval_iterator(
    None, 'test', 4, source=source, process_index=0, process_count=1
  )  # 2 batches, the second padded
  result = transformer_trainer.evaluate(eval_fn, params, {}, batches, mesh)
  assert result['num_examples'] == 7 and result['num_tokens'] == 7 * layout.image_len
  # By hand over all 7 examples, in float64.
  seq = np.concatenate([data['label'][:, None] + layout.cond_offset, data['codes']], axis=1)
  logits = np.asarray(
    jax.jit(model.apply)({'params': params}, jnp.asarray(seq[:, :-1])), np.float64
  )[:, :, : layout.n_image]
  m = logits.max(-1)
  logz = np.log(np.exp(logits - m[..., None]).sum(-1)) + m
  picked = np.take_along_axis(logits, data['codes'][..., None], -1)[..., 0]
  bits = np.sum(logz - picked) / (7 * layout.image_len) / np.log(2.0)
  np.testing.assert_allclose(result['bits_per_token'], bits, rtol=1e-5)


def test_spatial_conditioning_with_a_random_cond_vqgan():
  c = tiny_config('spatial')
  c.data.image_size = 16
  c.stage1_config.update(ch_mult=(1, 2, 2))  # f4: 4x4 image codes
  c.cond.update(key='segmentation', one_hot=5, random_init=True)
  c.cond.model.update(
    ch=32,
    ch_mult=(1, 1, 1),
    num_res_blocks=1,
    attn_resolutions=(),
    resolution=16,
    in_channels=5,
    out_ch=5,
    z_channels=8,
    n_embed=16,
    embed_dim=8,
  )
  layout = stage2_config.make_layout(c)
  assert (layout.cond_len, layout.cond_offset, layout.vocab_size) == (16, 32, 32 + 16)
  assert layout.block_size == 16 + 16 - 1
  shared = stage2_config.make_layout(dict_update(c, 'transformer.shared_vocab', True))
  assert (shared.cond_offset, shared.vocab_size) == (0, 32)
  cond_vqgan = vqgan_lib.from_config(c.cond.model, frozen=True)
  # Random encoder params without compiling an init (GroupNorm absorbs their scale).
  shapes = jax.eval_shape(
    lambda r: cond_vqgan.init(r, jnp.zeros((1, 16, 16, 5)), method='encode_to_indices')['params'],
    jax.random.PRNGKey(1),
  )
  rng = np.random.RandomState(1)
  cond_params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.randn(*s.shape), s.dtype), shapes)
  frozen = stage2.Frozen(cond=cond_vqgan, cond_one_hot=5)
  model = stage2_config.build_model(c, layout)
  tx, schedule = stage2.make_optimizer(c)
  state = jax.jit(functools.partial(stage2.init_state, model, tx))(jax.random.PRNGKey(0))
  batch = _random_batch(layout, 2)
  del batch['cond_codes']
  labels = np.random.RandomState(0).randint(0, 5, (2, 16, 16)).astype(np.int32)
  batch['cond_map'] = labels
  step = jax.jit(
    functools.partial(stage2.train_step, model, layout, tx, schedule, frozen, 1.0, 0.0)
  )
  new_state, metrics = step(state, {'cond': cond_params}, jax.tree.map(jnp.asarray, batch))
  assert np.isfinite(float(metrics['loss'])) and int(new_state['step']) == 1

  # The cond tokens: the cond VQGAN's codes of the one-hot maps, after the image codes.
  @jax.jit
  def both(p, b, x):
    tokens_ = stage2.cond_tokens(layout, stage2.encode_batch(frozen, {'cond': p}, b))
    return tokens_, cond_vqgan.apply({'params': p}, x, method='encode_to_indices')

  enc, codes = both(cond_params, jax.tree.map(jnp.asarray, batch), jax.nn.one_hot(labels, 5))
  codes = codes.reshape(2, -1)
  assert int(codes.max()) < 16 and len(np.unique(np.asarray(codes))) > 1
  np.testing.assert_array_equal(np.asarray(enc), np.asarray(codes) + 32)
  # The label-map preprocessing keeps labels (nearest) and crops like the image.
  m = tokens.preprocess_cond_map(np.arange(4 * 6).reshape(4, 6) % 5, 4, one_hot=5)
  assert m.shape == (4, 4) and m.dtype == np.int32 and set(np.unique(m)) <= set(range(5))


def dict_update(config, field, value):
  """A copy of `config` with one dotted field changed."""
  c = ml_collections.ConfigDict(config.to_dict())
  node = c
  *parents, name = field.split('.')
  for p in parents:
    node = node[p]
  node[name] = value
  return c


def test_sampling_never_draws_condition_ids():
  config = tiny_config('class')
  config.cond.drop_prob = 0.1  # a null class: classifier-free guidance
  layout = stage2_config.make_layout(config)
  model = stage2_config.build_model(config, layout, scan_layers=False)
  params = jax.jit(functools.partial(stage2.init_params, model))(jax.random.PRNGKey(0))
  # Make the condition ids the most likely outputs: the sampler must still avoid them.
  head = params['head']['kernel']
  params['head']['kernel'] = head.at[:, layout.n_image :].set(
    jnp.sum(jnp.abs(head), axis=1, keepdims=True) * 100
  )
  from vqgan_jax import sampling  # pylint: disable=g-import-not-at-top

  cond = stage2.class_tokens(layout, [0, 1, 2])
  out = sampling.sample(
    params, model, cond, jax.random.PRNGKey(0), steps=layout.image_len, top_k=None
  )
  assert out.shape == (3, layout.image_len) and int(out.max()) < layout.n_image
  guided = sampling.sample(
    params,
    model,
    cond,
    jax.random.PRNGKey(0),
    steps=layout.image_len,
    top_k=None,
    cfg_scale=3.0,
    uncond_tokens=jnp.full_like(cond, layout.null_id),
  )
  assert guided.shape == (3, layout.image_len) and 0 <= int(guided.min())
  assert int(guided.max()) < layout.n_image


# ----------------------------------------------------------------------------------------
# The tokenizer that encoded the codes
# ----------------------------------------------------------------------------------------


def _random_stage1(workdir, seed, step=600):
  """A stage-1 workdir holding a random smoke VQGAN (its params and config: what stage 2 reads
  of a stage-1 run), saved through the checkpoint API instead of training one. Two seeds are
  two tokenizers of the same architecture."""
  config = config_base.smoke_stage1()
  vqgan = vqgan_lib.from_config(config.model, frozen=True)
  shapes = jax.eval_shape(
    lambda r: nn.unbox(vqgan.init(r, jnp.zeros((1, 32, 32, 3)))['params']),
    jax.random.PRNGKey(0),
  )
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.randn(*s.shape), s.dtype), shapes)
  with checkpoints.Checkpointer(workdir, save_every=1) as ckpt:
    ckpt.save(step, {'params': params}, None, config, force=True)


def _write_codes(codes_dir, config, layout, tokenizer):
  """A small codes dataset with the metadata --mode=encode records (`tokenizer`: the identity
  of the stage 1 that encoded it; None: as an older version wrote it)."""
  rng = np.random.RandomState(0)
  meta = codes_lib._metadata(config, layout, tokenizer)  # pylint: disable=protected-access
  if tokenizer is None:
    del meta['tokenizer']

  def examples(split):
    yield {
      'codes': rng.randint(0, layout.n_image, (8, layout.image_len)),
      'label': rng.randint(0, 10, (8,)),
      'index': np.arange(8),
    }

  tokens.write_codes(
    codes_dir,
    tokens.codes_name(config.data),
    splits=['train', 'test'],
    examples=examples,
    seq_len=layout.image_len,
    n_embed=layout.n_image,
    metadata=json.loads(json.dumps(meta)),
  )


def test_stage2_refuses_codes_of_another_tokenizer(tmp_path, caplog):
  """Codes encoded by stage-1 run A; stage 2 pointed at run B of the same architecture is
  refused (train through main, the loader that sampling and eval use, and encoding into A's
  codes), naming both; a copy of A (moved workdir, same params) passes."""
  a, b, copy = tmp_path / 'stage1_a', tmp_path / 'stage1_b', tmp_path / 'copy_of_a'
  _random_stage1(a, seed=0)
  _random_stage1(b, seed=1)
  shutil.copytree(a, copy)
  codes_dir = tmp_path / 'codes'

  def setup(stage1, codes=codes_dir):
    c = fashion_mnist_transformer.get_config('smoke')
    c.stage1_workdir, c.data.codes_dir = str(stage1), str(codes)
    c.transformer.scan_layers = False
    return stage2_config.setup(c)

  def identity(config):  # what --mode=encode records, and what stage 2 checks the codes by
    config, mesh, layout = stage2_config.setup(config)
    return stage2.stage1_identity(config, layout, mesh)

  config, _, layout = setup(a)
  config_b, _, _ = setup(b)
  config_copy, _, _ = setup(copy)
  id_a, id_b = identity(config), identity(config_b)
  _write_codes(str(codes_dir), config, layout, id_a)
  assert id_a['params_sha256'] != id_b['params_sha256'] and id_a['step'] == id_b['step'] == 600

  # Training: one `error:` line naming both runs and both fingerprints, before step 1.
  s2 = tmp_path / 'stage2'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'vqgan_jax.main',
      '--config=configs/fashion_mnist_transformer.py:smoke',
      f'--workdir={s2}',
      f'--config.stage1_workdir={b}',
      f'--config.data.codes_dir={codes_dir}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''
  assert proc.returncode == 2 and err.startswith('error: The codes in '), proc.stderr[-3000:]
  for part in (f'{a} step 600', f'{b} step 600', id_a['params_sha256'][:12]):
    assert part in err, err
  assert id_b['params_sha256'][:12] in err and '--mode=encode' in err
  assert not (s2 / 'checkpoints').exists()

  # A copy of A (another path, the same params) is the same tokenizer.
  id_copy = identity(config_copy)
  assert id_copy['workdir'] != id_a['workdir'] and id_copy['params_sha256'] == id_a['params_sha256']
  codes_lib.open_codes(config_copy, None, layout, id_copy)

  # Sampling and eval load through `load_transformer_for_config`: the same check (a random
  # stage-2 checkpoint whose config names the codes; no step is compiled).
  model = stage2_config.build_model(config, layout, scan_layers=False)
  gpt = jax.eval_shape(lambda r: stage2.init_params(model, r), jax.random.PRNGKey(0))
  with checkpoints.Checkpointer(s2, save_every=1) as ckpt:
    ckpt.save(
      1,
      {'params': jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), gpt)},
      None,
      config,
      force=True,
    )
  with pytest.raises(ConfigError, match=f'were encoded by {a} step 600'):
    inference.load_transformer_for_config(config_b, str(s2))
  assert inference.load_transformer(str(s2), stage1_workdir=str(copy)).vqgan.step == 600

  # --mode=encode into A's codes with B: not "up to date", refused naming both (nothing is
  # encoded or lost without --config.encode.overwrite).
  with pytest.raises(tokens.DataError, match=f'encoded by {a} step 600.*not by.*{b} step 600'):
    codes_lib.encode(config_b, str(s2))
  assert codes_lib.encode(config_copy, str(s2))[2]  # kept: the same params

  # Codes written before the identity was recorded: one warning, and they are used.
  config_old = setup(b, tmp_path / 'old_codes')[0]
  _write_codes(str(tmp_path / 'old_codes'), config_old, layout, None)
  with caplog.at_level('WARNING'):
    codes_lib.open_codes(config_old, None, layout, id_b)
  assert 'record no tokenizer identity' in caplog.text and '--mode=encode' in caplog.text


# ----------------------------------------------------------------------------------------
# End to end: stage 1 -> encode -> stage 2 -> sample, through main
# ----------------------------------------------------------------------------------------


def _png_size(path):
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
  return struct.unpack('>II', head[16:24])


def _folder(root, per_class=12):
  """Two classes of 32x32 images: a small, fast-to-prepare stand-in for Fashion-MNIST."""
  rng = np.random.RandomState(0)
  for c, name in enumerate(('dark', 'light')):
    os.makedirs(root / name)
    for i in range(per_class):
      base = 60 + 120 * c
      img = np.clip(base + 40 * rng.randn(32, 32, 3), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / name / f'{i:02d}.png')
  return root


def _installed_python(root):
  """A fresh venv at `root` with this repo installed non-editable (a wheel built from a copy of
  the source), its dependencies taken from the running environment; returns its python.

  The running environment's site-packages is added by a `.pth` line, which adds the path
  without running that directory's own `.pth` files, so the editable install there (its import
  hook) is not seen: `import vqgan_jax` finds only the installed copy.
  """
  src = root / 'src'
  shutil.copytree(
    REPO,
    src,
    ignore=shutil.ignore_patterns(
      '.git', '.venv', 'workdirs', 'build', '*.egg-info', '__pycache__', '.pytest_cache'
    ),
  )
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(root / 'venv')], check=True)
  python = root / 'venv' / 'bin' / 'python'
  site = subprocess.run(
    [python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  with open(os.path.join(site, 'dependencies.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'install',
      '-q',
      '--no-deps',
      '--no-build-isolation',
      '--target',
      site,
      str(src),
    ],
    check=True,
    capture_output=True,
  )
  shutil.rmtree(src)
  return python


def _readme_python():
  """The code of the README's Python API section, as written."""
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  section = text.split('## Python API', 1)[1].split('\n## ', 1)[0]
  return '\n'.join(block.split('```', 1)[0] for block in section.split('```python\n')[1:])


@pytest.mark.slow
def test_installed_package_handoff_and_readme_api(tmp_path, request):
  """From a non-editable install in a fresh venv, run outside the repository with configs
  passed by absolute path: stage 1 -> encode -> stage 2 -> sample through `main`, then the
  README's Python example on those workdirs."""
  python = _installed_python(tmp_path / 'install')
  run_dir = tmp_path / 'elsewhere'
  run_dir.mkdir()
  where = subprocess.run(
    [python, '-c', 'import vqgan_jax.main as m; print(m.__file__)'],
    cwd=run_dir,
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  assert where.startswith(str(tmp_path / 'install' / 'venv')), where
  env = dict(os.environ)
  env.pop('PYTHONPATH', None)
  env.update(
    {
      'TFDS_DATA_DIR': str(tmp_path / 'tfds'),
      'PYTHONUNBUFFERED': '1',
      # A compilation cache kept in .pytest_cache (reruns skip most of the compiling), or in
      # tmp_path under -p no:cacheprovider.
      'JAX_COMPILATION_CACHE_DIR': str(
        request.config.cache.mkdir('stage2_jax_cache')
        if hasattr(request.config, 'cache')
        else tmp_path / 'jax_cache'
      ),
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1',
    }
  )
  folder = _folder(tmp_path / 'images')
  data = [
    '--config.data.name=folder',
    f'--config.data.folder={folder}',
    '--config.data.validation_fraction=0.25',
    '--config.data.eval_split=validation',
  ]
  # The README's workdir names, under a directory that is not the repository.
  a = run_dir / 'workdirs' / 'fashion_mnist_vqgan'
  b = run_dir / 'workdirs' / 'fashion_mnist_transformer'
  times = {}

  def run(args, timeout=600):
    return subprocess.run(
      [python, *args], cwd=run_dir, env=env, capture_output=True, text=True, timeout=timeout
    )

  def main(config, workdir, *flags):
    t0 = time.perf_counter()
    proc = run(
      [
        '-m',
        'vqgan_jax.main',
        f'--config={os.path.join(REPO, config)}',
        f'--workdir={workdir}',
        *data,
        *flags,
      ]
    )
    times[' '.join(flags[:1]) or config] = time.perf_counter() - t0
    assert proc.returncode == 0, f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return proc.stdout

  main(
    'configs/fashion_mnist_vqgan.py:smoke',
    a,
    '--config.train.num_steps=2',
    '--config.train.eval_every=2',
    '--config.train.checkpoint_every=2',
    '--config.train.log_every=1',
  )
  s2 = 'configs/fashion_mnist_transformer.py:smoke'
  out = main(s2, b, '--mode=encode', f'--config.stage1_workdir={a}')
  path = out.split('codes: ')[-1].strip()
  assert path == str(b / 'codes' / 'vqgan_codes' / 'folder_32_images' / '1.0.0')
  builder = tokens.open_codes(str(b / 'codes'), 'folder_32_images')
  train = builder.as_data_source('train')
  assert len(train) == 18 and len(builder.as_data_source('validation')) == 6
  ex = train[0]
  # The stage-1 smoke VQGAN: f2 -> 16x16 codes of 64.
  assert ex['codes'].shape == (256,) and ex['codes'].max() < 64 and ex['label'] in (0, 1)
  meta = tokens.metadata(builder)
  assert meta['stage1_step'] == 2
  # The tokenizer that encoded them, which stage 2 checks against its stage 1.
  assert meta['tokenizer']['workdir'] == str(a) and meta['tokenizer']['step'] == 2
  assert len(meta['tokenizer']['params_sha256']) == 64
  # Encoding again keeps up-to-date codes; codes made differently are replaced only when
  # asked, and the refusal names the field.
  assert 'up to date, kept: ' in main(s2, b, '--mode=encode', f'--config.stage1_workdir={a}')
  proc = run(
    [
      '-m',
      'vqgan_jax.main',
      f'--config={os.path.join(REPO, s2)}',
      f'--workdir={b}',
      *data,
      '--mode=encode',
      f'--config.stage1_workdir={a}',
      '--config.encode.max_examples=4',
    ]
  )
  assert proc.returncode == 2 and 'config.encode.overwrite' in proc.stderr
  assert len(tokens.open_codes(str(b / 'codes'), 'folder_32_images').as_data_source('train')) == 18

  out = main(
    s2,
    b,
    '--mode=train',
    f'--config.stage1_workdir={a}',
    '--config.train.num_steps=4',
    '--config.train.eval_every=4',
  )
  assert 'bits_per_token' in out and (b / 'checkpoints' / '4').is_dir()
  assert (b / 'metrics.jsonl').exists()

  out = main(s2, b, '--mode=sample', f'--config.stage1_workdir={a}')
  png, npz = b / 'samples_0000004.png', b / 'samples_0000004.npz'
  assert f'grid: {png}' in out and png.exists() and npz.exists()
  samples = np.load(npz)
  n = 10 * 2  # 10 classes x num_per_class 2
  assert samples['tokens'].shape == (n, 16, 16)
  assert samples['tokens'].min() >= 0 and samples['tokens'].max() < 64
  np.testing.assert_array_equal(samples['labels'], np.repeat(np.arange(10), 2))
  w, h = _png_size(png)
  assert (w, h) == ((2 * 34 + 2) * (512 // 70), (10 * 34 + 2) * (512 // 70))
  # --mode=eval draws class-balanced samples (no feature networks here: plumbing and files).
  out = main(s2, b, '--mode=eval', f'--config.stage1_workdir={a}', '--config.eval.num_samples=12')
  assert f'results: {b / "eval_4.json"}' in out
  result = json.loads((b / 'eval_4.json').read_text())
  assert result['num_samples'] == 12
  assert result['sampler'] == {
    'kind': 'gpt',
    'temperature': 1.0,
    'top_k': 16,
    'top_p': 1.0,
    'cfg_scale': 1.0,
    'seed': 0,
  }
  drawn = np.load(b / 'eval_samples_4.npz')
  assert drawn['arr_0'].shape == (12, 32, 32, 3) and drawn['arr_0'].dtype == np.uint8
  np.testing.assert_array_equal(drawn['arr_1'], np.arange(12) % 10)
  # A stage-1 config with different model fields is refused with the field named.
  proc = run(
    [
      '-m',
      'vqgan_jax.main',
      f'--config={os.path.join(REPO, s2)}',
      f'--workdir={b}',
      *data,
      '--mode=sample',
      f'--config.stage1_workdir={a}',
      '--config.stage1_config.n_embed=128',
    ]
  )
  assert proc.returncode == 2 and 'config.stage1_config.n_embed=128' in proc.stderr

  # The README's Python example, as written, on these workdirs (the smoke models' grids are
  # 16x16 where the demo's are 8x8; the example asserts nothing that depends on it).
  t0 = time.perf_counter()
  proc = run(['-c', _readme_python()])
  times['README python'] = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stderr[-5000:]
  print('handoff times (s):', {k: round(v, 1) for k, v in times.items()})
