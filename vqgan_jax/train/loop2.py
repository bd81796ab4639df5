"""Stage 2 drivers: encode a dataset to codes, train the GPT, sample images.

  encode:  stage-1 params (config.stage1_workdir) -> codes dataset (data/tokens.py)
  train:   codes (or images encoded in the step) -> sharded AdamW steps -> logs, evals
           (held-out bits per token over the whole eval split), checkpoints, resume
  sample:  stage-2 params + stage-1 decoder -> PNG grid and .npz of tokens in the workdir
"""

import functools
import json
import os
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
import tqdm

from vqgan_jax import checkpoints
from vqgan_jax import images as images_lib
from vqgan_jax import parallel
from vqgan_jax import sampling
from vqgan_jax.data import pipeline
from vqgan_jax.data import tokens
from vqgan_jax.train import stage2
from vqgan_jax.train.loop import Writer
from vqgan_jax.validate import ConfigError


def _gather_host(x):
  """The whole of `x` as numpy on every process: a process-local batch gathered in process
  order (numpy in), or a global jax.Array's value, however it is sharded."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def codes_dir(config, workdir):
  return config.data.codes_dir or os.path.join(workdir, 'codes')


def _stage1_step(workdir):
  if not workdir or not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    return None
  ckpt = checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def load_frozen(config, layout, mesh, *, stage1=True, cond=True):
  """The frozen VQGANs and their params on the mesh: (Frozen, params, shardings)."""
  models, params = {}, {}
  if stage1:
    if not config.stage1_workdir:
      raise ConfigError('config.stage1_workdir (the stage-1 run) is empty')
    models['stage1'] = stage2.build_vqgan(config.stage1_config)
  if cond and layout.kind == 'spatial':
    models['cond'] = stage2.build_vqgan(config.cond.model)
  shardings = {}
  for key, vqgan in models.items():
    size = vqgan.resolution
    x = jnp.zeros((1, size, size, vqgan.in_channels), jnp.float32)
    abstract = jax.eval_shape(lambda r, v=vqgan, x=x: v.init(r, x)['params'],
                              jax.random.PRNGKey(0))
    shardings[key] = parallel.state_shardings(abstract, mesh, parallel.axis_rules(config))
    if key == 'cond' and config.cond.random_init:
      logging.warning('config.cond.random_init: the cond VQGAN is randomly initialised')
      params[key] = jax.jit(lambda r, v=vqgan, x=x: v.init(r, x)['params'],
                            out_shardings=shardings[key])(jax.random.PRNGKey(config.seed + 1))
    else:
      workdir = config.stage1_workdir if key == 'stage1' else config.cond.workdir
      if not workdir:
        raise ConfigError('config.cond.workdir (the cond VQGAN\'s stage-1 run) is empty; '
                          'spatial conditioning needs a trained cond VQGAN')
      params[key] = checkpoints.restore_params(
          workdir, checkpoints.abstract_like(abstract, shardings[key]))
  frozen = stage2.Frozen(stage1=models.get('stage1'), cond=models.get('cond'),
                         cond_one_hot=int(config.cond.one_hot))
  return frozen, params, shardings


def _setup(config):
  config = stage2.resolve_config(config)
  mesh = parallel.make_mesh(config.mesh)
  stage2.validate_config(config, parallel.batch_divisor(mesh))
  return config, mesh, stage2.make_layout(config)


# ----------------------------------------------------------------------------------------
# --mode=encode
# ----------------------------------------------------------------------------------------

def _codes_metadata(config, layout):
  """What the codes depend on: equal metadata means the codes on disk are up to date."""
  return {'grid_h': layout.grid[0], 'grid_w': layout.grid[1],
          'n_embed': layout.n_image, 'cond_kind': layout.kind,
          'cond_grid': list(layout.cond_grid), 'cond_n_embed': layout.cond_n_embed,
          'stage1_workdir': os.path.abspath(config.stage1_workdir),
          'stage1_step': _stage1_step(config.stage1_workdir),
          'source': config.data.name, 'image_size': config.data.image_size,
          'max_examples': config.encode.max_examples}


def encode(config, workdir):
  """Writes the codes of data.train_split and data.eval_split; returns (path, counts, kept).

  Codes already on disk with the same metadata (same stage-1 run and step, data and grid)
  are kept and not encoded again; different ones are replaced only with
  config.encode.overwrite.
  """
  config, mesh, layout = _setup(config)
  name = tokens.codes_name(config.data)
  meta = _codes_metadata(config, layout)
  path = tokens.dataset_path(codes_dir(config, workdir), name)
  if tokens.is_prepared(path):
    builder = tokens.open_codes(codes_dir(config, workdir), name)
    if tokens.metadata(builder) == json.loads(json.dumps(meta)):
      logging.info('The codes in %s are up to date; not encoding again.', path)
      return path, {k: v.num_examples for k, v in builder.info.splits.items()}, True
  frozen, params, shardings = load_frozen(config, layout, mesh)
  spatial = layout.kind == 'spatial'
  batch_sh = parallel.batch_sharding(mesh)
  rep = parallel.replicated(mesh)

  def encode_fn(p, batch):
    out = stage2.encode_batch(frozen, p, batch)
    return {k: out[k] for k in ('codes', 'cond_codes') if k in out}

  encode_jit = jax.jit(encode_fn, in_shardings=(shardings, batch_sh), out_shardings=rep)
  splits = tokens.base_splits(config.data.train_split, config.data.eval_split)
  counts = {}

  def examples(split):
    it, n = tokens.ordered_batches(config.data, split, config.encode.batch_size,
                                   cond=config.cond if spatial else None,
                                   max_examples=config.encode.max_examples)
    counts[split] = n
    bar = tqdm.tqdm(total=n, disable=jax.process_index() != 0, dynamic_ncols=True,
                    desc=f'encode {split}')
    for batch in it:
      inputs = {'image': batch['image']}
      if spatial:
        inputs['cond_map'] = batch['cond_map']
      out = encode_jit(params, pipeline.to_global(inputs, batch_sh))
      rows = {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
      # Host-side bookkeeping of the whole global batch, in the same (process) order.
      meta = {k: _gather_host(batch[k]) for k in ('label', 'index', 'mask')}
      keep = meta['mask']
      rows = {k: v[keep] for k, v in rows.items()}
      rows.update(label=meta['label'][keep], index=meta['index'][keep])
      bar.update(int(keep.sum()))
      yield rows
    bar.close()

  t0 = time.perf_counter()
  path = tokens.write_codes(
      codes_dir(config, workdir), name, splits=splits, examples=examples,
      seq_len=layout.image_len, n_embed=layout.n_image,
      cond_len=layout.cond_len if spatial else 0, cond_n_embed=layout.cond_n_embed,
      metadata=meta, overwrite=config.encode.overwrite)
  logging.info('Encoded %s in %.1f s', counts, time.perf_counter() - t0)
  return path, counts, False


def _open_codes(config, workdir, layout):
  builder = tokens.open_codes(codes_dir(config, workdir), tokens.codes_name(config.data))
  meta = tokens.metadata(builder)
  if (meta.get('grid_h'), meta.get('grid_w'), meta.get('n_embed')) != (
      layout.grid[0], layout.grid[1], layout.n_image):
    raise ConfigError(
        f'The codes dataset {builder.data_path} holds {meta.get("grid_h")}x'
        f'{meta.get("grid_w")} grids of {meta.get("n_embed")} codes, but this config\'s '
        f'stage 1 gives {layout.grid[0]}x{layout.grid[1]} of {layout.n_image}: encode again '
        '(--mode=encode --config.encode.overwrite=True)')
  step = _stage1_step(config.stage1_workdir)
  if step is not None and meta.get('stage1_step') not in (None, step):
    logging.warning('The codes in %s were encoded at stage-1 step %s; %s is now at step %s.',
                    builder.data_path, meta.get('stage1_step'), config.stage1_workdir, step)
  return builder


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------

def evaluate(eval_fn, params, frozen_params, batches, mesh):
  """Held-out NLL over every batch of `batches` (one pass over the eval split)."""
  sharding = parallel.batch_sharding(mesh)
  totals = {'nll': 0.0, 'tokens': 0.0, 'examples': 0.0}
  for batch in batches:
    sums = jax.device_get(eval_fn(params, frozen_params, pipeline.to_global(batch, sharding)))
    for k in totals:
      totals[k] += float(sums[k])  # float64 on the host
  tokens_n = max(totals['tokens'], 1.0)
  nats = totals['nll'] / tokens_n
  return {'nll': nats, 'bits_per_token': nats / np.log(2.0), 'perplexity': float(np.exp(nats)),
          'num_examples': totals['examples'], 'num_tokens': totals['tokens']}


def train_and_evaluate(config, workdir):
  """Trains stage 2 in `workdir`, resuming from its latest checkpoint; returns final eval."""
  os.makedirs(workdir, exist_ok=True)
  config, mesh, layout = _setup(config)
  model = stage2.build_model(config, layout)
  tx, schedule = stage2.make_optimizer(config)
  rng = jax.random.PRNGKey(config.seed)
  init = functools.partial(stage2.init_state, model, tx)
  abstract = jax.eval_shape(init, rng)
  rules = parallel.axis_rules(config)
  shardings = stage2.state_shardings(model, tx, mesh, rng, rules)

  from_images = config.data.source == 'images'
  if from_images:
    frozen, frozen_params, frozen_sh = load_frozen(config, layout, mesh)
    train_it = pipeline.make_train_iterator(config.data, config.train.batch_size, config.seed)
    eval_batches = lambda: pipeline.make_eval_iterator(config.data, config.train.eval_batch_size)
    keys = ('image', 'label', 'mask')
  else:
    frozen, frozen_params, frozen_sh = stage2.Frozen(), {}, {}
    builder = _open_codes(config, workdir, layout)
    train_it = tokens.make_train_iterator(builder, config.data.train_split,
                                          config.train.batch_size, config.seed,
                                          worker_count=config.data.worker_count)
    eval_batches = lambda: tokens.make_eval_iterator(
        builder, config.data.eval_split, config.train.eval_batch_size,
        max_examples=config.data.eval_examples)
    keys = ('codes', 'label', 'cond_codes', 'mask')

  ckpt = checkpoints.Checkpointer(workdir, max_to_keep=config.train.max_to_keep,
                                  save_every=config.train.checkpoint_every)
  state = ckpt.resume(checkpoints.abstract_like(abstract, shardings), train_it, config=config,
                      fields=stage2.COMPATIBILITY_FIELDS)
  if state is not None:
    logging.info('Resumed from %s at step %d', workdir, int(state['step']))
  else:
    state = jax.jit(init, out_shardings=shardings)(rng)
    if config.init_from:
      state['params'] = stage2.restore_gpt_params(config.init_from, model, mesh, rules=rules)
      state['opt_state'] = jax.jit(tx.init, out_shardings=shardings['opt_state'])(
          state['params'])
      logging.info('Initialised params from %s (fresh optimizer state)', config.init_from)

  train_fn = stage2.make_train_step(config, model, layout, tx, schedule, mesh, shardings,
                                    frozen, frozen_sh)
  eval_fn = stage2.make_eval_step(model, layout, mesh, shardings['params'], frozen, frozen_sh,
                                  rules)
  writer = Writer(workdir)
  batch_sharding = parallel.batch_sharding(mesh)

  def run_eval(step):
    batches = ({k: b[k] for k in keys if k in b} for b in eval_batches())
    result = evaluate(eval_fn, state['params'], frozen_params, batches, mesh)
    writer.scalars(step, result, 'eval')
    return result

  start = int(jax.device_get(state['step']))
  total = config.train.num_steps
  tokens_per_step = config.train.batch_size * layout.image_len
  result = {}
  bar = tqdm.tqdm(total=total, initial=start, disable=jax.process_index() != 0,
                  dynamic_ncols=True, desc='stage2')
  t0, steps_since = time.perf_counter(), 0
  for step in range(start + 1, total + 1):
    batch = next(train_it)
    batch = pipeline.to_global({k: batch[k] for k in keys if k in batch and k != 'mask'},
                               batch_sharding)
    state, metrics = train_fn(state, frozen_params, batch)
    steps_since += 1
    bar.update(1)
    if step % config.train.log_every == 0 or step == total:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      dt = time.perf_counter() - t0
      metrics['tokens_per_s'] = steps_since * tokens_per_step / max(dt, 1e-9)
      t0, steps_since = time.perf_counter(), 0
      writer.scalars(step, metrics, 'train')
      bar.set_postfix(tok_s=f"{metrics['tokens_per_s']:.0f}", loss=f"{metrics['loss']:.4f}",
                      bpt=f"{metrics['bits_per_token']:.3f}", lr=f"{metrics['lr']:.2e}")
      if not np.isfinite(metrics['loss']):
        raise FloatingPointError(f'loss is {metrics["loss"]} at step {step}')
    if step % config.train.eval_every == 0 or step == total:
      result = run_eval(step)
      if jax.process_index() == 0:  # tqdm.write ignores `disable`
        bar.write(f'eval step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in result.items()))
      t0, steps_since = time.perf_counter(), 0
    ckpt.save(step, state, train_it.get_state, config, force=step == total)
  bar.close()
  if start >= total:  # Already finished: report the final model again.
    result = run_eval(start)
  ckpt.close()
  writer.close()
  return result


# ----------------------------------------------------------------------------------------
# --mode=sample
# ----------------------------------------------------------------------------------------

def _conditions(config, layout, workdir):
  """(cond ids (N, Lc), labels (N,), grid columns) of the samples to draw."""
  s = config.sample
  if layout.kind == 'class':
    classes = list(s.classes) if s.classes else list(range(layout.n_classes))
    bad = [c for c in classes if not 0 <= c < layout.n_classes]
    if bad:
      raise ConfigError(f'config.sample.classes {bad} outside [0, {layout.n_classes})')
    labels = np.repeat(np.asarray(classes, np.int32), s.num_per_class)
    return np.asarray(stage2.class_tokens(layout, labels)), labels, s.num_per_class
  if layout.kind == 'unconditional':
    labels = np.full((s.num_samples,), -1, np.int32)
    return np.asarray(stage2.class_tokens(layout, labels)), labels, None
  # Spatial: the cond codes of the first eval examples of the codes dataset.
  builder = _open_codes(config, workdir, layout)
  it = tokens.make_eval_iterator(builder, config.data.eval_split, s.num_samples,
                                 max_examples=s.num_samples, process_index=0, process_count=1)
  batch = next(it)
  keep = batch['mask']
  return (batch['cond_codes'][keep] + layout.cond_offset, batch['label'][keep], None)


class Sampling(NamedTuple):
  """A trained stage-2 run, ready for `sampling.sample_images(params, model, vqgan, ...)`."""
  config: Any
  layout: stage2.Layout
  model: Any              # the GPT, per-layer layout (what the decode loop runs on)
  vqgan: Any              # the frozen stage-1 VQGAN (decoder for the codes)
  params: dict            # {'gpt': ..., 'vqgan': ...}
  step: int
  mesh: Any


def load_sampling(config, workdir) -> Sampling:
  """The latest stage-2 params of `workdir` and its stage-1 decoder, for sampling."""
  config, mesh, layout = _setup(config)
  ckpt = checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise checkpoints.CheckpointError(f'No stage-2 checkpoint in {ckpt.directory}: train '
                                        'first (--mode=train).')
    saved = ckpt.restore_config()
  finally:
    ckpt.close()
  checkpoints.check_compatible(saved, config, tuple(
      f for f in stage2.COMPATIBILITY_FIELDS if f != 'transformer.scan_layers'),
                               where=workdir)
  model = stage2.build_model(config, layout, scan_layers=False)
  params = stage2.restore_gpt_params(workdir, model, mesh, saved,
                                     rules=parallel.axis_rules(config))
  frozen, frozen_params, _ = load_frozen(config, layout, mesh, cond=False)
  return Sampling(config, layout, model, frozen.stage1,
                  {'gpt': params, 'vqgan': frozen_params['stage1']}, step, mesh)


def sample(config, workdir):
  """Samples with the latest stage-2 params; writes samples_<step>.png/.npz; returns paths."""
  run = load_sampling(config, workdir)
  config, layout, step = run.config, run.layout, run.step
  s = config.sample
  h, w = s.grid_h or layout.grid[0], s.grid_w or layout.grid[1]
  windowed = (h, w) != tuple(layout.grid)
  if windowed:
    if layout.grid[0] != layout.grid[1]:
      raise ConfigError(f'the sliding window needs a square training grid, got {layout.grid}')
    if layout.kind == 'spatial':
      raise ConfigError('config.sample.grid_h/grid_w: the sliding window with spatial '
                        'conditioning needs cond maps of the larger size; not supported here')
  guided = s.cfg_scale != 1.0
  if guided and layout.null_id < 0:
    raise ConfigError('config.sample.cfg_scale != 1 needs a model trained with class dropout '
                      '(config.cond.drop_prob > 0, offset vocabulary)')
  filters = dict(temperature=float(s.temperature), top_k=int(s.top_k) or None,
                 top_p=float(s.top_p), cfg_scale=float(s.cfg_scale) if guided else None,
                 grid=(h, w), window=layout.grid[0] if windowed else None)

  cond, labels, ncol = _conditions(config, layout, workdir)
  n = len(cond)
  rng = jax.random.PRNGKey(s.seed)
  # Every process samples the same batches (the same conditions and keys) on the mesh that
  # spans them all: the inputs are replicated global arrays, the outputs gathered.
  rep = parallel.replicated(run.mesh)
  out_tokens, out_images = [], []
  t0 = time.perf_counter()
  for i, start in enumerate(range(0, n, s.batch_size)):
    c_host = np.asarray(cond[start:start + s.batch_size], np.int32)
    c = jax.device_put(c_host, rep)
    uncond = jax.device_put(np.full_like(c_host, layout.null_id), rep) if guided else None
    grid, images = sampling.sample_images(run.params, run.model, run.vqgan, c,
                                          jax.random.fold_in(rng, i), uncond_tokens=uncond,
                                          **filters)
    out_tokens.append(_gather_host(grid))
    out_images.append(images_lib.to_uint8(_gather_host(images)))
  elapsed = time.perf_counter() - t0
  toks = np.concatenate(out_tokens)
  imgs = np.concatenate(out_images)
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  grid_img = images_lib.make_grid(imgs, ncol)
  png = os.path.join(workdir, f'samples_{step:07d}.png')
  npz = os.path.join(workdir, f'samples_{step:07d}.npz')
  if jax.process_index() == 0:
    images_lib.save_png(png, grid_img, scale=max(1, 512 // grid_img.shape[1]))
    extra = {'cond_tokens': np.asarray(cond)}
    np.savez(npz, tokens=toks, labels=labels, **extra)
  return {'png': png, 'npz': npz, 'num_samples': n, 'grid': (h, w), 'seconds': elapsed,
          'tokens_per_s': n * h * w / max(elapsed, 1e-9)}
