"""Trains the transformer (stage 2): codes (or images encoded in the step) -> sharded AdamW
steps -> logs, held-out bits per code over the whole eval split, checkpoints, resume.

The GPT and MaskGIT (`transformer.kind`) share this loop; their steps differ (`stage2`). For
MaskGIT, `bits_per_token` (train and eval) is per *masked* code: the NLL of the codes it had to
fill in under cosine-schedule masks, not comparable to the GPT's bits per code."""

import functools

from absl import logging
import jax
import numpy as np

from vqgan_jax import checkpoints
from vqgan_jax import encode as codes_lib
from vqgan_jax import parallel
from vqgan_jax.data import pipeline
from vqgan_jax.data import tokens
from vqgan_jax.models import gpt_load
from vqgan_jax.train import common
from vqgan_jax.train import stage2


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
  return {
    'nll': nats,
    'bits_per_token': nats / np.log(2.0),
    'perplexity': float(np.exp(nats)),
    'num_examples': totals['examples'],
    'num_tokens': totals['tokens'],
  }


def _data(config, workdir, layout, mesh):
  """(frozen, its params, their shardings, the train iterator, a function returning the eval
  batches, the batch keys the steps read): codes from the codes dataset, or images encoded in
  the step by the frozen first stage."""
  if config.data.source == 'images':
    pipeline.check_splits(config.data)
    frozen, frozen_params, frozen_sh = gpt_load.load_frozen(config, layout, mesh)
    train_it = pipeline.make_train_iterator(config.data, config.train.batch_size, config.seed)
    eval_batches = lambda: pipeline.make_eval_iterator(config.data, config.train.eval_batch_size)
    return frozen, frozen_params, frozen_sh, train_it, eval_batches, ('image', 'label', 'mask')
  # Every start and resume: the codes must come from the stage 1 that will decode samples.
  tokenizer = gpt_load.stage1_identity(config, layout, mesh)
  builder = codes_lib.open_codes(config, workdir, layout, tokenizer)
  tokens.check_splits(builder, config.data)
  options = pipeline.read_options(config.data)
  train_it = tokens.make_train_iterator(
    builder,
    config.data.train_split,
    config.train.batch_size,
    config.seed,
    worker_count=config.data.worker_count,
    options=options,
    crop=layout.crop,
  )
  eval_batches = lambda: tokens.make_eval_iterator(
    builder,
    config.data.eval_split,
    config.train.eval_batch_size,
    max_examples=config.data.eval_examples,
    options=options,
    crop=layout.crop,
  )
  keys = ('codes', 'label', 'cond_codes', 'mask')
  return stage2.Frozen(), {}, {}, train_it, eval_batches, keys


def _init_from(config, state, model, tx, mesh, shardings, rules):
  """A fresh run's state with the params of config.init_from and a fresh optimizer state."""
  state['params'] = gpt_load.restore_gpt_params(config.init_from, model, mesh, rules=rules)
  state['opt_state'] = jax.jit(tx.init, out_shardings=shardings['opt_state'])(state['params'])
  logging.info('Initialised params from %s (fresh optimizer state)', config.init_from)
  return state


def train_and_evaluate(config, workdir):
  """Trains stage 2 in `workdir`, resuming from its latest checkpoint; returns the final eval.

  The function `python -m vqgan_jax.main` calls for a stage-2 config (`vqgan_jax.train_stage2`).
  """
  workdir = common.prepare_workdir(workdir)
  config, mesh, layout = gpt_load.setup(config)
  common.check_init_from(config.init_from, 'transformer')
  model = gpt_load.build_model(config, layout)
  tx, schedule = stage2.make_optimizer(config)
  rng = jax.random.PRNGKey(config.seed)
  rules = parallel.axis_rules(config)
  abstract, shardings, init = common.setup_initial_state(
    functools.partial(stage2.init_state, model, tx),
    rng,
    lambda _: stage2.gpt_state_shardings(model, tx, mesh, rng, rules),
  )

  frozen, frozen_params, frozen_sh, train_it, eval_batches, keys = _data(
    config, workdir, layout, mesh
  )

  with checkpoints.Checkpointer(
    workdir, max_to_keep=config.train.max_to_keep, save_every=config.train.checkpoint_every
  ) as ckpt:
    state, resumed = common.restore_or_init(
      ckpt, abstract, shardings, init, train_it, config, fields=gpt_load.COMPATIBILITY_FIELDS
    )
    if not resumed and config.init_from:
      state = _init_from(config, state, model, tx, mesh, shardings, rules)

    train_fn = stage2.make_train_step(
      config, model, layout, tx, schedule, mesh, shardings, frozen, frozen_sh
    )
    eval_fn = stage2.make_eval_step(
      model, layout, mesh, shardings['params'], frozen, frozen_sh, rules
    )
    batch_sharding = parallel.batch_sharding(mesh)
    start = int(jax.device_get(state['step']))
    writer = common.Writer(workdir, start)

    def run_eval(s, step):
      batches = ({k: b[k] for k in keys if k in b} for b in eval_batches())
      result = evaluate(eval_fn, s['params'], frozen_params, batches, mesh)
      writer.scalars(step, result, 'eval')
      return result

    def next_batch():
      batch = next(train_it)
      return pipeline.to_global(
        {k: batch[k] for k in keys if k in batch and k != 'mask'}, batch_sharding
      )

    try:
      state, result = common.train_loop(
        state,
        (config, ckpt, train_it, writer),
        step_fn=lambda s, b: train_fn(s, frozen_params, b),
        next_batch=next_batch,
        evaluate=run_eval,
        loss_key='loss',
        rate=('tokens_per_s', config.train.batch_size * layout.image_len),
        postfix=lambda m: dict(
          tok_s=f'{m["tokens_per_s"]:.0f}',
          loss=f'{m["loss"]:.4f}',
          bpt=f'{m["bits_per_token"]:.3f}',
          lr=f'{m["lr"]:.2e}',
        ),
        desc='stage2',
      )
    finally:
      writer.close()
  return result
