"""MaskGIT (transformer.kind='maskgit'): bidirectionality, the masked-code loss, the masking
schedules, the parallel-decoding sampler's invariants, the sharded step, and a train -> sample
run through `python -m vqgan_jax.main` on a tiny random stage 1 and codes."""

import functools
import json
import math
import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist_maskgit
from vqgan_jax import checkpoints
from vqgan_jax import classifier_features
from vqgan_jax import config_base
from vqgan_jax import inference
from vqgan_jax import maskgit_sampling
from vqgan_jax import metrics
from vqgan_jax import parallel
from vqgan_jax import run_config
from vqgan_jax.data import builders
from vqgan_jax.data import pipeline
from vqgan_jax.data import tokens
from vqgan_jax.models import classifier as classifier_lib
from vqgan_jax.models import maskgit as maskgit_lib
from vqgan_jax.models import vqgan as vqgan_lib
from vqgan_jax.train import stage2
from vqgan_jax.train import stage2_config
from vqgan_jax.validate import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CLASSES = 5


def tiny_config(**transformer):
  """MaskGIT over a 4x4 grid of 32 codes after a class token (5 classes + the null class),
  2 layers, width 32; no checkpoint needed."""
  c = fashion_mnist_maskgit.get_config('smoke')
  c.stage1_workdir = ''
  c.stage1_config.update(ch_mult=(1, 2, 2, 2), n_embed=32)  # f8: 32 px -> 4x4
  c.data.image_size = 32
  c.cond.update(kind='class', n_classes=N_CLASSES, drop_prob=0.2)
  c.transformer.update(n_layer=2, n_head=2, n_embd=32, **transformer)
  c.train.update(batch_size=16, dtype='float32')
  c.optim.update(warmup_steps=0, schedule='constant', base_lr=2e-4)  # lr 3.2e-3
  return c


def class_codes(labels, n=16):
  """The toy data: class c's grid is (7c + i) mod 32 at position i."""
  return (7 * np.asarray(labels)[:, None] + np.arange(n)) % 32


def toy_batch(layout, b, seed):
  labels = np.random.RandomState(seed).randint(0, N_CLASSES, (b,))
  return {'codes': class_codes(labels).astype(np.int32), 'label': labels.astype(np.int32)}


@pytest.fixture(scope='module')
def tiny():
  config = tiny_config()
  layout = stage2_config.make_layout(config)
  model = stage2_config.build_model(config, layout)
  tx, schedule = stage2.make_optimizer(config)
  # One jitted forward (over batches of 16) for every test that runs the model directly.
  forward = jax.jit(lambda p, seq: model.apply({'params': p}, seq))
  return types.SimpleNamespace(
    config=config, layout=layout, model=model, tx=tx, schedule=schedule, forward=forward
  )


def _mesh(config):
  return parallel.make_mesh(config.mesh, None if config.mesh.data != -1 else jax.devices()[:1])


def _run_steps(t, config, batches):
  """(metrics per step, final state, initial state on the host) of make_train_step on
  config.mesh (-1: one device)."""
  mesh = _mesh(config)
  shardings = stage2.gpt_state_shardings(t.model, t.tx, mesh, rules=parallel.axis_rules(config))
  state = jax.jit(functools.partial(stage2.init_state, t.model, t.tx), out_shardings=shardings)(
    jax.random.PRNGKey(0)
  )
  init = jax.device_get(state)  # before donation
  step = stage2.make_train_step(config, t.model, t.layout, t.tx, t.schedule, mesh, shardings)
  metrics = []
  for batch in batches:
    state, m = step(state, {}, jax.device_put(batch, parallel.batch_sharding(mesh)))
    metrics.append(jax.tree.map(float, jax.device_get(m)))
  return metrics, state, init


@pytest.fixture(scope='module')
def trained(tiny):
  """(params, metrics per step, initial state) of the tiny model after 200 steps on the toy
  data on one device: it knows each class's grid."""
  batches = [toy_batch(tiny.layout, 16, s) for s in range(200)]
  metrics, state, init = _run_steps(tiny, tiny.config, batches)
  # (One batch's accuracy is noisy: masks of all 16 codes with the class dropped are guesses.)
  assert np.mean([m['accuracy'] for m in metrics[-20:]]) > 0.85, metrics[-1]
  return jax.tree.map(np.asarray, jax.device_get(state['params'])), metrics, init


# ----------------------------------------------------------------------------------------
# Model, config, loss
# ----------------------------------------------------------------------------------------


def test_layout_and_config_checks(tiny):
  lay = tiny.layout
  # Offset vocabulary: 32 codes, 5 classes, the null class, then [MASK]; no -1 on the block.
  assert (lay.vocab_size, lay.null_id, lay.mask_id, lay.block_size) == (39, 37, 38, 17)
  assert lay.seq_len == 17 and lay.transformer_kind == 'maskgit'
  assert isinstance(tiny.model, maskgit_lib.MaskGIT) and tiny.model.n_image == 32
  # A config older than the field is a GPT.
  old = tiny_config()
  del old.transformer['kind']
  old.transformer.label_smoothing = 0.0
  assert stage2_config.make_layout(old).transformer_kind == 'gpt'
  assert not run_config.config_differences(
    old.to_dict(), config_base.stage2_base(), ('transformer.kind',)
  )
  bad = tiny_config(kind='diffusion')
  with pytest.raises(ConfigError, match="transformer.kind='diffusion'"):
    stage2_config.make_layout(bad)
  with pytest.raises(ConfigError, match='pkeep'):
    stage2_config.validate_config(tiny_config(pkeep=0.9))
  with pytest.raises(ConfigError, match='label_smoothing'):
    stage2_config.validate_config(tiny_config(kind='gpt'))
  # A config file that still sets MaskGIT's decoding iterations under their old name.
  renamed = tiny_config()
  renamed.sample.steps = 4
  with pytest.raises(ConfigError, match=r'config\.sample\.steps is now config\.sample\.iterations'):
    stage2_config.resolve_config(renamed)


def test_bidirectional(tiny, trained):
  """Changing the last code changes the logits at every earlier position (the GPT's causal
  mask would leave them; test_transformer.py keeps its causality test)."""
  batch = toy_batch(tiny.layout, 16, 1)
  seq = jnp.asarray(np.concatenate([batch['label'][:, None] + 32, batch['codes']], 1))
  base = tiny.forward(trained[0], seq)
  assert base.shape == (16, 17, 32) and base.dtype == jnp.float32  # image codes only
  out = tiny.forward(trained[0], seq.at[:, -1].set(tiny.layout.mask_id))
  assert float(jnp.abs(out[:, :-1] - base[:, :-1]).max(axis=-1).min()) > 1e-4


@functools.partial(jax.jit, static_argnums=3)
def _masked_loss(logits, codes, mask, smoothing):
  """(loss, nll, d loss / d logits) of stage2.masked_token_nll, compiled once."""
  loss = lambda x: stage2.masked_token_nll(x, codes, mask, smoothing)
  return *loss(logits), jax.grad(lambda x: loss(x)[0])(logits)


def test_masked_position_loss(tiny, trained):
  rng = np.random.RandomState(0)
  logits = rng.randn(16, 16, 32).astype(np.float32)
  codes = rng.randint(0, 32, (16, 16))
  m = rng.rand(16, 16) < 0.4
  loss, nll, grad = _masked_loss(logits, codes, m, 0.1)
  lp = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
  picked = -np.take_along_axis(lp, codes[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(nll), picked[m].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(loss), (0.9 * picked - 0.1 * lp.mean(-1))[m].mean(), rtol=1e-5)
  # Unmasked positions get no gradient (and so do not move the loss).
  grad = np.asarray(grad)
  assert not np.any(grad[~m]) and np.all(np.abs(grad[m]).sum(-1) > 0)

  # Training masks: ceil(cos(pi/2 r) N) positions (1..N), r ~ U(0, 1).
  @jax.jit
  def masks_and_ratios(keys):
    r = jax.vmap(lambda k: jax.random.uniform(jax.random.split(k)[0], ()))(keys)
    return stage2.random_mask(keys, 16), r

  masks, r = masks_and_ratios(jax.random.split(jax.random.PRNGKey(3), 2000))
  counts = np.asarray(masks).sum(1)
  assert counts.min() >= 1 and counts.max() == 16
  want = np.clip(np.ceil(np.cos(np.pi / 2 * np.asarray(r, np.float64)) * 16), 1, 16)
  np.testing.assert_array_equal(counts, want)
  # E[count] = N * E[cos(pi/2 r)] = N * 2/pi (plus the ceil's ~1/2).
  assert abs(counts.mean() - (16 * 2 / np.pi + 0.5)) < 0.3

  # The fixture's first step (toy_batch seed 0, from init_state(PRNGKey(0))): its inputs hold
  # [MASK] exactly where its keys mask, and its loss is the masked loss of the model on them.
  t, metrics, state = tiny, trained[1][0], trained[2]
  batch = toy_batch(t.layout, 16, 0)

  @jax.jit
  def step_inputs(rng, batch):  # as maskgit_train_step draws them
    k_cond, k_mask, _ = jax.random.split(jax.random.fold_in(rng, 0), 3)
    mask = stage2.random_mask(jax.random.split(k_mask, 16), 16)
    cond = stage2.cond_tokens(t.layout, batch, k_cond, t.config.cond.drop_prob)
    return mask, stage2.maskgit_inputs(t.layout, cond, batch['codes'], mask)

  mask, inputs = step_inputs(state['rng'], batch)
  assert np.all((np.asarray(inputs[:, 1:]) == t.layout.mask_id) == np.asarray(mask))
  logits = t.forward(state['params'], inputs)[:, 1:]
  want, want_nll, _ = _masked_loss(logits, batch['codes'], mask, 0.1)
  np.testing.assert_allclose(metrics['loss'], float(want), rtol=1e-5)
  np.testing.assert_allclose(metrics['bits_per_token'], float(want_nll) / np.log(2), rtol=1e-5)
  np.testing.assert_allclose(metrics['mask_ratio'], float(np.mean(mask)), rtol=1e-6)


def test_eval_masks_depend_on_the_example_only(tiny, trained):
  """Held-out NLL: the same masks for an example whatever batch it is in (and padding)."""
  data = toy_batch(tiny.layout, 6, 7)
  data['codes'][:, 3] += np.arange(6)  # distinct examples
  ev = jax.jit(
    functools.partial(stage2.maskgit_eval_step, tiny.model, tiny.layout, stage2.Frozen())
  )

  def padded(rows, real):  # 8 rows: `real` of them, then copies of the first marked padding
    pad = lambda v: np.concatenate([v[rows], np.repeat(v[rows][:1], 8 - len(rows), 0)])
    batch = {k: pad(v) for k, v in data.items()}
    return dict(batch, mask=np.arange(8) < real)

  whole = ev(trained[0], {}, padded(np.arange(6), 6))
  parts = [ev(trained[0], {}, padded(np.arange(i, i + 3), 3)) for i in (0, 3)]
  for k in ('nll', 'tokens', 'examples'):
    np.testing.assert_allclose(float(whole[k]), sum(float(p[k]) for p in parts), rtol=1e-5)
  assert 6 <= float(whole['tokens']) <= 6 * 16 and float(whole['examples']) == 6


# ----------------------------------------------------------------------------------------
# Schedules and the sampler
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('schedule', maskgit_lib.SCHEDULES)
def test_schedule_mask_counts(schedule):
  gamma = {
    'cosine': lambda r: math.cos(math.pi / 2 * r),
    'linear': lambda r: 1 - r,
    'square': lambda r: 1 - r * r,
  }[schedule]
  for n, steps in ((256, 8), (256, 12), (16, 4), (16, 16), (3, 8)):
    counts = maskgit_sampling.mask_counts(n, steps, schedule)
    assert len(counts) == steps and counts[-1] == 0
    prev = n
    for t, k in enumerate(counts[:-1]):
      assert k == max(1, min(prev - 1, math.floor(n * gamma((t + 1) / steps)))), (n, steps, t)
      prev = k
  assert maskgit_sampling.mask_counts(256, 8, 'cosine') == (251, 236, 212, 181, 142, 97, 49, 0)
  assert maskgit_sampling.mask_counts(256, 4, 'linear') == (192, 128, 64, 0)
  assert maskgit_sampling.mask_counts(256, 4, 'square') == (240, 192, 112, 0)


def test_confidence_scores():
  """'sampled' scores the drawn code, 'max' the position's likeliest, whatever was drawn."""
  logp = jnp.log(jnp.asarray([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
  drawn = jnp.asarray([[2, 0]])
  np.testing.assert_allclose(maskgit_sampling.score(logp, drawn, 'sampled'), np.log([[0.1, 0.1]]))
  np.testing.assert_allclose(maskgit_sampling.score(logp, drawn, 'max'), np.log([[0.7, 0.8]]))


def test_step_temperature_moves_linearly_from_temperature_to_final_temperature():
  temps = [maskgit_sampling.step_temperature(1.0, 2.0, t, 5) for t in range(5)]
  np.testing.assert_allclose(temps, [1.0, 1.25, 1.5, 1.75, 2.0])
  assert maskgit_sampling.step_temperature(0.7, 0.7, 3, 8) == 0.7
  assert maskgit_sampling.step_temperature(1.5, 0.5, 0, 1) == 1.5  # one iteration: the first


def test_sampler_invariants(tiny, trained):
  """Every step leaves exactly the schedule's count masked, a decoded code never changes,
  nothing is masked at the end, a key always gives the same codes, and each class's samples
  are that class's grid (the model learnt them), also under guidance."""
  lay, model, params = tiny.layout, tiny.model, trained[0]
  labels = np.arange(N_CLASSES).repeat(2)
  cond = stage2.class_tokens(lay, labels)
  # temperature 0.5: the label-smoothed model gives its class's code p ~ 0.9 at temperature 1.
  run = functools.partial(
    maskgit_sampling.sample, params, model, cond, iterations=6, temperature=0.5, return_history=True
  )
  counts = maskgit_sampling.mask_counts(16, 6, 'cosine')
  for confidence in maskgit_sampling.CONFIDENCES:
    codes, hist = run(jax.random.PRNGKey(0), confidence=confidence)
    codes, hist = np.asarray(codes), np.asarray(hist)
    masked = hist == lay.mask_id
    np.testing.assert_array_equal(masked.sum(-1), np.broadcast_to(counts, (len(labels), 6)))
    for t in range(5):
      kept = ~masked[:, t]
      assert np.all(hist[:, t + 1][kept] == hist[:, t][kept]), t  # kept codes stay
    assert not masked[:, -1].any() and np.array_equal(codes, hist[:, -1])
    assert codes.min() >= 0 and codes.max() < lay.n_image
    assert (class_codes(labels) == codes).mean() > 0.95, confidence
  codes, hist = (np.asarray(a) for a in run(jax.random.PRNGKey(0)))  # 'sampled', the default
  np.testing.assert_array_equal(np.asarray(run(jax.random.PRNGKey(0))[0]), codes)
  assert (class_codes(labels) == codes).mean() > 0.95
  other = np.asarray(run(jax.random.PRNGKey(1), temperature=3.0)[0])
  assert not np.array_equal(other, codes)  # another key (and a flat distribution) differs
  # Guidance mixes the two halves: scale 1 is the conditional model, 0 the unconditional
  # one (the null class: these samples ignore their class).
  guided = functools.partial(
    run, jax.random.PRNGKey(0), schedule='linear', uncond_tokens=jnp.full_like(cond, lay.null_id)
  )
  assert (class_codes(labels) == np.asarray(guided(cfg_scale=1.0)[0])).mean() > 0.95
  assert (class_codes(labels) == np.asarray(guided(cfg_scale=0.0)[0])).mean() < 0.5
  greedy = np.asarray(run(jax.random.PRNGKey(5), temperature=0.0, choice_temperature=0.0)[0])
  assert (class_codes(labels) == greedy).mean() > 0.95
  with pytest.raises(ValueError, match='schedule'):
    run(jax.random.PRNGKey(0), schedule='exp')
  with pytest.raises(ValueError, match=r"confidence must be one of \('sampled', 'max'\)"):
    run(jax.random.PRNGKey(0), confidence='drawn')
  with pytest.raises(ValueError, match='iterations must be an integer >= 1'):
    maskgit_sampling.sample(params, model, cond, jax.random.PRNGKey(0), iterations=0)
  # final_temperature: equal to temperature is the constant temperature (the same codes);
  # from 3.0 (flat) at the first step to 0.5 at the last, the draws differ.
  np.testing.assert_array_equal(
    np.asarray(run(jax.random.PRNGKey(0), final_temperature=0.5)[0]), codes
  )
  ramped = np.asarray(run(jax.random.PRNGKey(0), temperature=3.0, final_temperature=0.5)[0])
  assert not np.array_equal(ramped, codes)
  with pytest.raises(ValueError, match='final_temperature must be >= 0'):
    run(jax.random.PRNGKey(0), final_temperature=-1.0)
  # `steps`, its old name (the GPT's `steps` count tokens), still works with a warning.
  with pytest.warns(DeprecationWarning, match='now `iterations`'):
    old = maskgit_sampling.sample(
      params, model, cond, jax.random.PRNGKey(0), steps=6, temperature=0.5
    )
  np.testing.assert_array_equal(np.asarray(old), codes)


def test_sharded_step_matches_single_device(tiny, trained):
  """Three steps on a (data 2, fsdp 2, tensor 2) mesh of 8 fake devices: the same losses
  and metrics as the first three on one device, parameters sharded by the GPT's logical
  axes."""
  batches = [toy_batch(tiny.layout, 16, s) for s in range(3)]
  single = trained[1][:3]
  config = tiny_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  multi, state, _ = _run_steps(tiny, config, batches)
  for a, b in zip(single, multi):
    for k in ('loss', 'bits_per_token', 'accuracy', 'mask_ratio', 'grad_norm'):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=k)
  assert single[0]['loss'] != single[2]['loss']  # the updates reached the later losses
  p = state['params']
  assert tuple(p['blocks']['mlp_0']['kernel'].sharding.spec) == (None, 'fsdp', 'tensor')
  assert tuple(p['head']['kernel'].sharding.spec) == ('fsdp', 'tensor')  # 32 codes / 2
  assert tuple(p['tok_emb']['embedding'].sharding.spec) == (None, 'fsdp')  # 39 ids: odd
  mu = state['opt_state'][0].mu
  assert tuple(mu['head']['kernel'].sharding.spec) == ('fsdp', 'tensor')


# ----------------------------------------------------------------------------------------
# Through main: train -> sample
# ----------------------------------------------------------------------------------------


def _fake_stage1(workdir):
  """A stage-1 workdir holding a random smoke VQGAN (what stage 2 reads of a stage-1 run:
  its params and config), without training one."""
  config = config_base.smoke_stage1()
  vqgan = vqgan_lib.from_config(config.model, frozen=True)
  shapes = jax.eval_shape(
    lambda r: nn.unbox(vqgan.init(r, jnp.zeros((1, 32, 32, 3)))['params']),
    jax.random.PRNGKey(0),
  )
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.randn(*s.shape), s.dtype), shapes)
  with checkpoints.Checkpointer(workdir, save_every=1) as ckpt:
    ckpt.save(1, {'params': params}, None, config, force=True)


def _codes(codes_dir, config):
  """The codes dataset --mode=encode would write: 16x16 grids of 64 codes, 10 classes."""
  c = stage2_config.resolve_config(config)
  layout = stage2_config.make_layout(c)
  rng = np.random.RandomState(0)

  def examples(split):
    n = 32 if split == 'train' else 8
    labels = rng.randint(0, 10, (n,))
    yield {
      'codes': rng.randint(0, layout.n_image, (n, layout.image_len)),
      'label': labels,
      'index': np.arange(n),
    }

  tokens.write_codes(
    codes_dir,
    tokens.codes_name(c.data),
    splits=['train', 'test'],
    examples=examples,
    seq_len=layout.image_len,
    n_embed=layout.n_image,
    metadata={'grid_h': layout.grid[0], 'grid_w': layout.grid[1], 'n_embed': layout.n_image},
  )


def _fake_classifier(workdir):
  """A classifier run of random params (what eval reads of one: its params and config): 10
  classes, 4 features, on 32x32 images."""
  c = config_base.classifier_base()
  c.model.update(features=(8,), hidden=4, feature_name='toy')
  c.data.image_size = 32
  model = classifier_lib.from_config(c.model)
  shapes = jax.eval_shape(
    lambda r: model.init(r, jnp.zeros((1, 32, 32, 3)))['params'], jax.random.PRNGKey(0)
  )
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.randn(*s.shape), s.dtype), shapes)
  with checkpoints.Checkpointer(workdir, save_every=1) as ckpt:
    ckpt.save(1, {'params': params}, None, c, force=True)


def _image_folder(root, per_class=6):
  """Two classes of 32x32 RGB images: eval's reference images."""
  rng = np.random.RandomState(2)
  for c, name in enumerate(('dark', 'light')):
    os.makedirs(root / name)
    for i in range(per_class):
      img = np.clip(60 + 120 * c + 40 * rng.randn(32, 32, 3), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / name / f'{i}.png')
  return root


def _classifier_outputs(clf, images_m11):
  """(features, logits) of float64 of [-1, 1] images, padded to the mesh's batch divisor."""
  pad = -len(images_m11) % parallel.batch_divisor(clf.mesh)
  x = np.concatenate([images_m11, np.repeat(images_m11[-1:], pad, 0)]) if pad else images_m11
  out = clf(x)
  return tuple(
    np.asarray(out[k])[: len(images_m11)].astype(np.float64) for k in ('features', 'logits')
  )


@pytest.mark.slow
def test_main_train_then_sample(tmp_path):
  stage1_dir, workdir, codes_dir = tmp_path / 'stage1', tmp_path / 'maskgit', tmp_path / 'codes'
  _fake_stage1(stage1_dir)
  config = fashion_mnist_maskgit.get_config('smoke')
  config.stage1_workdir = str(stage1_dir)
  _codes(str(codes_dir), config)
  env = dict(os.environ)

  def main(*flags):
    proc = subprocess.run(
      [
        sys.executable,
        '-m',
        'vqgan_jax.main',
        '--config=configs/fashion_mnist_maskgit.py:smoke',
        f'--workdir={workdir}',
        f'--config.stage1_workdir={stage1_dir}',
        f'--config.data.codes_dir={codes_dir}',
        '--config.train.num_steps=2',
        '--config.train.eval_every=2',
        '--config.train.checkpoint_every=2',
        '--config.train.dtype=float32',
        '--config.optim.warmup_steps=0',
        *flags,
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return proc.stdout

  out = main()
  assert 'bits_per_token' in out and (workdir / 'checkpoints' / '2').is_dir()
  out = main('--mode=sample', '--config.sample.iterations=4', '--config.sample.schedule=square')
  samples = np.load(workdir / 'samples_0000002.npz')
  assert samples['tokens'].shape == (10 * 2, 16, 16)  # 10 classes x num_per_class 2
  assert 0 <= samples['tokens'].min() and samples['tokens'].max() < 64
  np.testing.assert_array_equal(samples['labels'], np.repeat(np.arange(10), 2))
  assert (workdir / 'samples_0000002.png').exists()

  # load_transformer serves MaskGIT runs too; it samples the training grid only.
  # (--mode=sample ran TrainedTransformer.sample; the refusals come before anything compiles.)
  run = inference.load_transformer(str(workdir))
  assert run.kind == 'maskgit' and isinstance(run.model, maskgit_lib.MaskGIT)
  with pytest.raises(ValueError, match='training grid'):
    run.sample(run.condition_for_class([3]), grid=(32, 32))

  # --mode=eval with a classifier: its fd and class accuracy equal what is computed here from
  # the samples eval wrote and the reference images (a folder, all of it the 'train' split).
  clf_dir, folder = tmp_path / 'classifier', _image_folder(tmp_path / 'images')
  _fake_classifier(clf_dir)
  out = main(
    '--mode=eval',
    '--config.sample.iterations=4',
    '--config.sample.schedule=square',
    '--config.eval.num_samples=8',
    f'--config.eval.classifier_workdir={clf_dir}',
    '--config.data.name=folder',
    f'--config.data.folder={folder}',
    f'--config.data.data_dir={tmp_path / "tfds"}',
    '--config.data.validation_fraction=0.0',
  )
  assert f'results: {workdir / "eval_2.json"}' in out
  result = json.loads((workdir / 'eval_2.json').read_text())
  assert result['sampler']['kind'] == 'maskgit' and result['sampler']['iterations'] == 4
  assert result['num_samples'] == 8 and result['reference'] == {
    'dataset': 'folder',
    'split': 'train',
  }
  drawn = np.load(workdir / 'eval_samples_2.npz')
  # The ADM evaluator's layout: uint8 NHWC images under arr_0, labels under arr_1.
  np.testing.assert_array_equal(drawn['arr_1'], np.arange(8))  # class-balanced
  clf = classifier_features.load_classifier(
    str(clf_dir), parallel.make_mesh(config_base.classifier_base().mesh)
  )
  names = sorted(p for p in builders.list_image_folder(str(folder)).paths)
  real = np.stack([pipeline.preprocess(builders.load_rgb(str(folder / p)), 32) for p in names])
  fr, _ = _classifier_outputs(clf, real.astype(np.float32) / 127.5 - 1.0)
  # Eval measured the float images it decoded; the file holds them as uint8 (1/255 apart).
  fx, logits = _classifier_outputs(clf, drawn['arr_0'].astype(np.float32) / 127.5 - 1.0)
  expected = metrics.frechet_distance(
    fr.mean(0), np.cov(fr, rowvar=False), fx.mean(0), np.cov(fx, rowvar=False)
  )
  assert result['fd_toy'] == pytest.approx(expected, rel=1e-2) and expected > 0
  assert result['class_accuracy'] == np.mean(np.argmax(logits, -1) == drawn['arr_1'])
