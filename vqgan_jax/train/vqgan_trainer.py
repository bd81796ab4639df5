"""Trains a VQGAN (stage 1): data -> sharded fused AE + discriminator step -> logs (codebook
health included), held-out evals (PSNR, SSIM, LPIPS, L1, codebook usage; of the EMA params when
the run keeps them), reconstruction grids, checkpoints, resume."""

import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import tqdm

from vqgan_jax import checkpoints
from vqgan_jax import feature_nets
from vqgan_jax import parallel
from vqgan_jax import stage1_eval
from vqgan_jax import validate
from vqgan_jax.data import pipeline
from vqgan_jax.models import vqgan_load
from vqgan_jax.models.quantizer import QUANTIZERS
from vqgan_jax.train import common
from vqgan_jax.train import stage1


def evaluate(config, eval_fn, params, lpips_params, mesh, workdir, step, writer, nets=None):
  """One pass over the held-out split (`stage1_eval.run`, as `--mode=eval`): its figures go to
  the logs, the reconstructions of the first images to a grid."""
  result, (inputs, recons) = stage1_eval.run(
    eval_fn,
    params,
    lpips_params,
    pipeline.make_eval_iterator(config.data, config.train.eval_batch_size),
    mesh,
    nets or {},
    num_grid=config.train.num_grid_images,
  )
  if jax.process_index() == 0:
    path = os.path.join(workdir, f'reconstructions_{step:07d}.png')
    writer.image(step, 'eval/reconstructions', stage1_eval.save_pairs(path, inputs, recons))
  writer.scalars(step, result, 'eval')
  return result


def _init_from(config, state, abstract, shardings):
  """Parameters (and a compatible discriminator) of another stage-1 run, fresh optimizer."""
  src = config.init_from
  state['params'] = checkpoints.restore_params(
    src, checkpoints.abstract_like(abstract['params'], shardings['params'])
  )
  # The optional entries follow the new params: the params EMA starts at them, the EMA
  # codebook statistics are the source's when it kept them, else count 1 at its codebook.
  fresh = [k for k in ('params_ema', 'quantizer') if k in state]
  if 'quantizer' in state:
    try:
      state['quantizer'] = checkpoints.restore_params(
        src,
        checkpoints.abstract_like(abstract['quantizer'], shardings['quantizer']),
        key='quantizer',
      )
      fresh.remove('quantizer')
    except checkpoints.CheckpointError:
      pass
  if fresh:
    state.update(
      jax.jit(
        lambda p: stage1.fresh_optional_state(config, fresh, p),
        out_shardings={k: shardings[k] for k in fresh},
      )(state['params'])
    )
  # A converted release trains with its GAN on from step 0: start from its discriminator too
  # when the source has a compatible one.
  try:
    for key in ('disc_params', 'disc_stats'):
      state[key] = checkpoints.restore_params(
        src, checkpoints.abstract_like(abstract[key], shardings[key]), key=key
      )
  except checkpoints.CheckpointError as e:
    logging.warning('init_from %s: discriminator not restored (%s)', src, e)
  logging.info('Initialised params from %s (fresh optimizer state)', src)
  return state


def _resume(ckpt, config, models, mesh, setup, train_it):
  """(state, resumed): the latest checkpoint's state, or `init()` when there is none.

  The optional state entries (`stage1.optional_state_keys`) follow this config: those the
  checkpoint lacks (a run from before they existed, or one that had them off) start fresh,
  those this config turned off are dropped. What the checkpoint holds is read off the config
  saved with it (its keys are a function of that config)."""
  abstract, shardings, init = setup
  want = stage1.optional_state_keys(config)
  have = want
  if ckpt.latest_step() is not None:
    have = stage1.optional_state_keys(ml_collections.ConfigDict(ckpt.restore_config()))
  if set(have) == set(want):
    return common.restore_or_init(ckpt, abstract, shardings, init, train_it, config)
  # The target: exactly the entries the checkpoint holds.
  union = tuple(dict.fromkeys(want + have))
  full = jax.eval_shape(
    lambda r: stage1.init_state(config, models, r, optional=union), jax.random.PRNGKey(0)
  )
  optional = set(stage1.OPTIONAL_KEYS)
  target = {k: v for k, v in full.items() if k not in optional or k in have}
  target_sh = parallel.state_shardings(target, mesh, parallel.axis_rules(config))
  state, resumed = common.restore_or_init(ckpt, target, target_sh, init, train_it, config)
  missing = [k for k in want if k not in have]
  dropped = [k for k in have if k not in want]
  logging.info('Resumed state: %s start fresh, %s dropped (config changed)', missing, dropped)

  def adapt(s):
    s = {k: v for k, v in s.items() if k not in dropped}
    s.update(stage1.fresh_optional_state(config, missing, s['params']))
    return s

  return jax.jit(adapt, out_shardings=shardings)(state), resumed


class _CodebookHealth:
  """The progress bar's postfix, and one warning line the first time the codebook usage over
  a whole window (config.train.usage_window steps) falls below config.train.usage_warning."""

  def __init__(self, config, start):
    self.step = start  # the step the last metrics belong to (the step function counts)
    self.window = config.train.usage_window
    self.threshold = config.train.usage_warning
    self.n_embed = config.model.n_embed
    self.warned = False

  def counted(self, step_fn):
    def fn(*args):
      self.step += 1
      return step_fn(*args)

    return fn

  def postfix(self, m):
    usage = m.get('window_usage', m['codebook_usage'])
    if (
      'window_usage' in m
      and not self.warned
      and self.step >= self.window
      and usage < self.threshold
    ):
      self.warned = True
      if jax.process_index() == 0:
        tqdm.tqdm.write(
          f'WARNING: step {self.step}: the codebook is collapsing: {usage:.1%} of its '
          f'{self.n_embed} codes were picked in the last {self.window} steps (below '
          f'config.train.usage_warning={self.threshold}); see model.quantizer and the vq '
          'options (codebook_l2_norm, codebook_dim, ema_decay, restart_window)'
        )
    return dict(
      img_s=f'{m["images_per_s"]:.1f}',
      rec=f'{m["rec_loss"]:.4f}',
      p=f'{m["p_loss"]:.4f}',
      q=f'{m["quant_loss"]:.4f}',
      d=f'{m["disc_loss"]:.3f}',
      use=f'{usage:.0%}',
      ppl=f'{m["perplexity"]:.1f}',
    )


def train_and_evaluate(config, workdir):
  """Trains stage 1 in `workdir`, resuming from its latest checkpoint; returns the final eval.

  The function `python -m vqgan_jax.main` calls for a stage-1 config (`vqgan_jax.train_stage1`).
  """
  mesh = parallel.make_mesh(config.mesh)
  validate.validate_stage1(config, parallel.batch_divisor(mesh))
  if QUANTIZERS[config.model.quantizer].fit_step is not None:
    return fit_and_evaluate(config, workdir, mesh)
  # The runs this one reads, before anything is written in `workdir`.
  common.check_init_from(config.init_from, 'vqgan', config, validate.QUANTIZER_FIELDS)
  feature_nets.check(config, training=True)
  workdir = common.prepare_workdir(workdir)
  pipeline.check_splits(config.data)
  models = vqgan_load.build_models(config)

  lpips_params, lpips_shardings = feature_nets.load_lpips(mesh)
  setup = stage1.state_setup(config, models, mesh, jax.random.PRNGKey(config.seed))
  abstract, shardings, _ = setup
  train_it = pipeline.make_train_iterator(config.data, config.train.batch_size, config.seed)

  with checkpoints.Checkpointer(
    workdir, max_to_keep=config.train.max_to_keep, save_every=config.train.checkpoint_every
  ) as ckpt:
    state, resumed = _resume(ckpt, config, models, mesh, setup, train_it)
    if not resumed and config.init_from:
      state = _init_from(config, state, abstract, shardings)
    train_fn = stage1.make_train_step(config, models, mesh, shardings, lpips_shardings)
    eval_fn = stage1_eval.make_eval_step(models, mesh, shardings['params'], lpips_shardings)
    batch_sharding = parallel.batch_sharding(mesh)
    start = int(jax.device_get(state['step']))
    writer = common.Writer(workdir, start)
    health = _CodebookHealth(config, start)
    try:
      # With config.train.params_ema_decay the held-out eval measures the EMA params.
      nets = feature_nets.extractors(config, mesh, training=True)
      run_eval = lambda s, step: evaluate(
        config,
        eval_fn,
        s.get('params_ema', s['params']),
        lpips_params,
        mesh,
        workdir,
        step,
        writer,
        nets,
      )
      state, result = common.train_loop(
        state,
        (config, ckpt, train_it, writer),
        step_fn=health.counted(lambda s, images: train_fn(s, lpips_params, images)),
        next_batch=_image_feeder(train_it, batch_sharding),
        evaluate=run_eval,
        loss_key='total_loss',
        rate=('images_per_s', config.train.batch_size),
        postfix=health.postfix,
        desc='stage1',
      )
    finally:
      writer.close()
  return result


def _image_feeder(train_it, batch_sharding):
  """The next global batch of training images, as the steps take it."""
  return lambda: pipeline.to_global({'image': next(train_it)['image']}, batch_sharding)['image']


def fit_and_evaluate(config, workdir, mesh):
  """Stage 1 of a fitted quantizer (`QuantizerSpec.fit_step`: k-means over pixel values):
  its fit on config.train.num_steps batches of config.train.batch_size training images (its
  start, `fit_init`, on one more), with the trainer's logs, evals and checkpoints. The state
  {'step', 'params', 'fit'} is saved in the stage-1 format with the config, so --mode=encode,
  stage 2, --mode=eval and `load_vqgan` read it as any stage-1 run; a rerun resumes exactly
  (the data iterator's position is saved with it)."""
  m, t = config.model, config.train
  spec = QUANTIZERS[m.quantizer]
  fitted = f'config.model.quantizer={m.quantizer!r} is fitted on the data, not trained'
  validate.check(not config.init_from, f'config.init_from: {fitted}; set it to ""')
  validate.check(
    t.params_ema_decay == 0,
    f'config.train.params_ema_decay={t.params_ema_decay}: {fitted} (no EMA); set it to 0',
  )
  workdir = common.prepare_workdir(workdir)
  pipeline.check_splits(config.data)
  models = vqgan_load.build_models(config)
  lpips_params, lpips_shardings = feature_nets.load_lpips(mesh)
  key = jax.random.PRNGKey(config.seed)
  points = lambda images: vqgan_load.to_model_range(images).reshape(-1, m.embed_dim)

  def init(images):
    params, stats = spec.fit_init(m, points(images), key)
    return {'step': jnp.zeros((), jnp.int32), 'params': {'quantize': params}, 'fit': stats}

  def step(state, images):
    params, stats, metrics = spec.fit_step(
      m, state['params']['quantize'], state['fit'], points(images)
    )
    return {'step': state['step'] + 1, 'params': {'quantize': params}, 'fit': stats}, metrics

  size = config.data.image_size
  batch = jax.ShapeDtypeStruct((t.batch_size, size, size, m.in_channels), jnp.uint8)
  abstract = jax.eval_shape(init, batch)
  shardings = parallel.state_shardings(abstract, mesh, parallel.axis_rules(config))
  batch_sharding = parallel.batch_sharding(mesh)
  init_fn = jax.jit(init, in_shardings=batch_sharding, out_shardings=shardings)
  step_fn = jax.jit(
    step,
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )
  train_it = pipeline.make_train_iterator(config.data, t.batch_size, config.seed)
  next_batch = _image_feeder(train_it, batch_sharding)
  with checkpoints.Checkpointer(
    workdir, max_to_keep=t.max_to_keep, save_every=t.checkpoint_every
  ) as ckpt:
    state, _ = common.restore_or_init(
      ckpt, abstract, shardings, lambda: init_fn(next_batch()), train_it, config
    )
    eval_fn = stage1_eval.make_eval_step(models, mesh, shardings['params'], lpips_shardings)
    writer = common.Writer(workdir, int(jax.device_get(state['step'])))
    try:
      nets = feature_nets.extractors(config, mesh, training=True)
      state, result = common.train_loop(
        state,
        (config, ckpt, train_it, writer),
        step_fn=step_fn,
        next_batch=next_batch,
        evaluate=lambda s, i: evaluate(
          config, eval_fn, s['params'], lpips_params, mesh, workdir, i, writer, nets
        ),
        loss_key='inertia',
        rate=('images_per_s', t.batch_size),
        postfix=lambda h: dict(inertia=f'{h["inertia"]:.5f}', use=f'{h["codebook_usage"]:.0%}'),
        desc='fit',
      )
    finally:
      writer.close()
  return result
