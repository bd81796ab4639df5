"""Trains the small classifier behind the offline Frechet distance (`fd_<name>`): the same
data pipeline, sharded steps, checkpoints, resume and logs as the two stages, so a classifier
workdir is like any other."""

import functools

import jax
import jax.numpy as jnp
import optax

from vqgan_jax import checkpoints
from vqgan_jax import parallel
from vqgan_jax.data import pipeline
from vqgan_jax.models import classifier as classifier_lib
from vqgan_jax.train import common
from vqgan_jax.validate import ConfigError


def _optimizer(config):
  o, total = config.optim, config.train.num_steps
  warmup = min(int(o.warmup_steps), max(total - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(total, warmup + 1))
  return optax.adamw(schedule, weight_decay=o.weight_decay)


def _model_input(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def init_state(config, model, tx, rng):
  size = config.data.image_size
  params = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))['params']
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}


def train_step(model, tx, state, batch):
  def loss_fn(params):
    _, logits = model.apply({'params': params}, _model_input(batch['image']))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == batch['label'])

  (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new = {
    'step': state['step'] + 1,
    'params': optax.apply_updates(state['params'], updates),
    'opt_state': opt_state,
  }
  return new, {'loss': loss, 'accuracy': acc}


def eval_step(model, params, batch):
  _, logits = model.apply({'params': params}, _model_input(batch['image']))
  w = batch['mask'].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(batch['label'], 0))
  right = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'correct': jnp.sum(right * w), 'nll': jnp.sum(nll * w), 'count': jnp.sum(w)}


def _check(config):
  if config.data.name != 'folder' and config.model.num_classes < 2:
    raise ConfigError(f'config.model.num_classes={config.model.num_classes}: need >= 2')
  if not config.model.feature_name:
    raise ConfigError(
      "config.model.feature_name is empty: name the data (e.g. 'fmnist'), the metric is "
      'reported as fd_<feature_name>'
    )


def train_and_evaluate(config, workdir):
  """Trains the classifier in `workdir` (resuming); returns the held-out accuracy."""
  workdir = common.prepare_workdir(workdir)
  _check(config)
  mesh = parallel.make_mesh(config.mesh)
  pipeline.check_splits(config.data)
  model = classifier_lib.from_config(config.model)
  tx = _optimizer(config)
  rng = jax.random.PRNGKey(config.seed)
  abstract, shardings, init = common.setup_initial_state(
    functools.partial(init_state, config, model, tx),
    rng,
    lambda a: jax.tree.map(lambda _: parallel.replicated(mesh), a),
  )
  batch_sh = parallel.batch_sharding(mesh)
  step_fn = jax.jit(
    functools.partial(train_step, model, tx),
    in_shardings=(shardings, batch_sh),
    out_shardings=(shardings, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )
  eval_fn = jax.jit(
    functools.partial(eval_step, model),
    in_shardings=(shardings['params'], batch_sh),
    out_shardings=parallel.replicated(mesh),
  )
  train_it = pipeline.make_train_iterator(config.data, config.train.batch_size, config.seed)

  def evaluate(state, step):
    totals = {'correct': 0.0, 'nll': 0.0, 'count': 0.0}
    it = pipeline.make_eval_iterator(config.data, config.train.eval_batch_size)
    for batch in it:
      sums = jax.device_get(eval_fn(state['params'], pipeline.to_global(batch, batch_sh)))
      for k in totals:
        totals[k] += float(sums[k])
    n = max(totals['count'], 1.0)
    result = {'accuracy': totals['correct'] / n, 'nll': totals['nll'] / n, 'num_images': n}
    writer.scalars(step, result, 'eval')
    return result

  with checkpoints.Checkpointer(
    workdir, max_to_keep=config.train.max_to_keep, save_every=config.train.checkpoint_every
  ) as ckpt:
    state, _ = common.restore_or_init(ckpt, abstract, shardings, init, train_it, config)
    start = int(jax.device_get(state['step']))
    writer = common.Writer(workdir, start)
    try:
      _, result = common.train_loop(
        state,
        (config, ckpt, train_it, writer),
        step_fn=step_fn,
        next_batch=lambda: pipeline.to_global(
          {k: v for k, v in next(train_it).items() if k in ('image', 'label')}, batch_sh
        ),
        evaluate=evaluate,
        loss_key='loss',
        rate=('images_per_s', config.train.batch_size),
        postfix=lambda m: dict(
          img_s=f'{m["images_per_s"]:.0f}', loss=f'{m["loss"]:.3f}', acc=f'{m["accuracy"]:.3f}'
        ),
        desc='classifier',
      )
    finally:
      writer.close()
  return result
