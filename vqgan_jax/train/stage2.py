"""Stage 2: the conditional GPT over frozen VQGAN codes (taming's Net2NetTransformer), or
MaskGIT's bidirectional transformer over the same codes (`transformer.kind='maskgit'`, see
"MaskGIT" below).

A training example is the token sequence `[condition | image codes]`:

* condition: one SOS token (unconditional), the class as one token (class-conditional), or
  the codes of a second frozen VQGAN over a depth / segmentation map (spatial);
* image codes: the stage-1 VQGAN's code grid, flattened row-major.

The GPT runs on the sequence minus its last token; the outputs at positions
[cond_len - 1, end) predict the image codes, and only those positions are scored (mean
cross-entropy over the image codes, as the original). With `pkeep < 1` each *input* image
token is replaced by a uniformly random code with probability 1 - pkeep; targets stay clean.

Vocabulary: see `vqgan_jax/config_base.py`. Either way the softmax of the loss, and the
sampler, only range over the n_image image codes: with the original's shared table (vocab =
n_image) this is exactly its loss; with the offset convention condition ids can never be
predicted or sampled.

Optimizer: AdamW(0.9, 0.95), weight decay on Dense kernels only, lr = base_lr x global batch
(taming's rule) with optional warm-up and cosine decay. Parameters and optimizer state are
sharded by the GPT's logical axes under `config.logical_axis_rules` on the
`parallel.make_mesh` ('data', 'fsdp', 'tensor') mesh; the batch is split over data x fsdp.

MaskGIT: the input is `[condition | image codes]` with ceil(cos(pi/2 r) N) of the N codes
replaced by the [MASK] id (r ~ U(0, 1) per example, positions uniformly at random); the loss
is the label-smoothed cross-entropy at the masked positions only (mean over every masked code
of the global batch); class dropout as for the GPT. Held-out: the NLL of the masked codes
under masks drawn the same way from a key that depends only on the example's codes, so every
eval (any batch size, mesh or process count) scores the same masks.

Parameter layout: training runs with `scan_layers=True` by default (stacked `blocks`: one
layer to compile, the pods' layout; on CPU unrolled layers train faster, see
`models.transformer`) and checkpoints that layout as is (the optimizer state mirrors it; no
copy at save time). The run's config records it (`transformer.scan_layers`); restoring for sampling
or fine-tuning reads it from the saved config and converts (`restore_gpt_params`).

The GPT's construction, shardings and restore and the frozen encoders live in
`models.gpt_load` (the loaders use them); the names imported from it with `noqa: F401` stay
importable here for callers of `stage2.*`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqgan_jax import parallel
from vqgan_jax.models import maskgit as maskgit_lib
from vqgan_jax.models.gpt_load import Frozen
from vqgan_jax.models.gpt_load import Layout
from vqgan_jax.models.gpt_load import _rules
from vqgan_jax.models.gpt_load import class_tokens  # noqa: F401
from vqgan_jax.models.gpt_load import cond_map_codes  # noqa: F401
from vqgan_jax.models.gpt_load import encode_batch
from vqgan_jax.models.gpt_load import image_codes  # noqa: F401
from vqgan_jax.models.gpt_load import init_params
from vqgan_jax.models.gpt_load import load_frozen  # noqa: F401
from vqgan_jax.models.gpt_load import param_shardings
from vqgan_jax.models.gpt_load import restore_gpt_params  # noqa: F401
from vqgan_jax.models.gpt_load import stage1_identity  # noqa: F401
from vqgan_jax.train.common import peak_learning_rate

# ----------------------------------------------------------------------------------------
# Sequences and the loss
# ----------------------------------------------------------------------------------------


def cond_tokens(layout: Layout, batch, rng=None, drop_prob: float = 0.0):
  """(B, cond_len) condition ids of a batch ('label' for classes, 'cond_codes' for spatial).
  With `rng` and drop_prob > 0, classes are replaced by the null id at that rate."""
  b = batch['codes'].shape[0]
  if layout.kind == 'unconditional':
    return jnp.full((b, 1), layout.sos_id, jnp.int32)
  if layout.kind == 'class':
    ids = batch['label'].astype(jnp.int32).reshape(b, 1) + layout.cond_offset
    if rng is not None and drop_prob > 0:
      ids = jnp.where(jax.random.bernoulli(rng, drop_prob, (b, 1)), layout.null_id, ids)
    return ids
  return batch['cond_codes'].astype(jnp.int32) + layout.cond_offset


def corrupt(rng, codes, pkeep: float, n_image: int):
  """taming's pkeep: each token kept with probability pkeep, else a uniform random code."""
  if pkeep >= 1.0:
    return codes
  k_keep, k_rand = jax.random.split(rng)
  keep = jax.random.bernoulli(k_keep, pkeep, codes.shape)
  return jnp.where(keep, codes, jax.random.randint(k_rand, codes.shape, 0, n_image, codes.dtype))


def model_inputs(cond, codes_in):
  """The GPT input: [cond | image codes] without the last token."""
  return jnp.concatenate([cond, codes_in], axis=1)[:, :-1]


def image_token_nll(logits, codes, cond_len: int, n_image: int):
  """(B, L) NLL in nats of each image code.

  logits (B, cond_len + L - 1, V) are the GPT's outputs on `model_inputs`; output
  cond_len - 1 + i predicts code i. Outputs at the condition positions (which would predict
  condition tokens) are never read, and the softmax ranges over image codes only.
  """
  lg = logits[:, cond_len - 1 :, :n_image].astype(jnp.float32)
  picked = jnp.take_along_axis(lg, codes[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jax.nn.logsumexp(lg, axis=-1) - picked


# ----------------------------------------------------------------------------------------
# Optimizer and state
# ----------------------------------------------------------------------------------------


def decay_mask(params):
  """True for Dense kernels (key/query/value/proj, mlp, head): taming decays `nn.Linear`
  weights only; biases, LayerNorm, tok_emb and pos_emb are not decayed."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: parallel.key_name(path[-1]) == 'kernel', params
  )


def learning_rate_schedule(config):
  o = config.optim
  peak = peak_learning_rate(config)
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if o.warmup_steps else peak,
      peak_value=peak,
      warmup_steps=o.warmup_steps,
      decay_steps=config.train.num_steps,
      end_value=peak * o.final_lr_fraction,
    )
  if not o.warmup_steps:
    return optax.constant_schedule(peak)
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, o.warmup_steps), optax.constant_schedule(peak)],
    [o.warmup_steps],
  )


def make_optimizer(config):
  """(tx, schedule): AdamW(b1, b2) with decoupled weight decay on kernels only."""
  o = config.optim
  schedule = learning_rate_schedule(config)
  tx = optax.adamw(
    schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask
  )
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, schedule


def init_state(model, tx, rng):
  """The training state as a plain dict pytree (what the checkpoints hold)."""
  k_init, k_run = jax.random.split(rng)
  params = init_params(model, k_init)
  return {
    'step': jnp.zeros((), jnp.int32),
    'params': params,
    'opt_state': tx.init(params),
    'rng': k_run,
  }


def gpt_state_shardings(model, tx, mesh, rng=None, rules=None):
  """Shardings of the state: params by logical axes, optimizer moments like their params,
  scalars replicated."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  rep = parallel.replicated(mesh)
  p_sh = param_shardings(model, mesh, rng, rules)
  abstract_params = jax.eval_shape(functools.partial(init_params, model), rng)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  o_sh = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract_opt,
    p_sh,
    transform_non_params=lambda _: rep,
    is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
  )
  return {'step': rep, 'params': p_sh, 'opt_state': o_sh, 'rng': rep}


class MeshFunction:
  """A jitted function called (or lowered ahead of time) under the mesh and the logical-axis
  rules (the GPT's activation constraints resolve against them at trace time)."""

  def __init__(self, fn, mesh, rules=None):
    self.fn, self.mesh = fn, mesh
    self.rules = parallel.mesh_rules(mesh, _rules(rules))

  def __call__(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn.lower(*args)


# ----------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------


def _adamw_step(
  objective, model, layout: Layout, tx, schedule, frozen: Frozen, drop_prob, state, fp, batch
):
  """The step both transformers share: the step's keys, the codes (encoded here from images),
  the (dropped-out) condition, the AdamW update and the norms. `objective(key, cond, codes)`
  returns what differs: (inputs, `loss(logits) -> (loss, its metrics)`)."""
  step = state['step']
  k_cond, k_objective, k_drop = jax.random.split(jax.random.fold_in(state['rng'], step), 3)
  batch = encode_batch(frozen, fp, batch)
  codes = batch['codes'].astype(jnp.int32)
  inputs, loss_of = objective(k_objective, cond_tokens(layout, batch, k_cond, drop_prob), codes)
  deterministic = not (model.embd_pdrop or model.resid_pdrop or model.attn_pdrop)

  def loss_fn(params):
    logits = model.apply(
      {'params': params}, inputs, deterministic=deterministic, rngs={'dropout': k_drop}
    )
    return loss_of(logits)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = {
    'loss': loss,
    **metrics,
    'grad_norm': optax.global_norm(grads),
    'param_norm': optax.global_norm(params),
    'lr': schedule(step),
  }
  return dict(state, step=step + 1, params=params, opt_state=opt_state), metrics


def train_step(
  model,
  layout: Layout,
  tx,
  schedule,
  frozen: Frozen,
  pkeep: float,
  drop_prob: float,
  state,
  frozen_params,
  batch,
):
  """One AdamW step on a batch of codes (or images, encoded here); returns (state, metrics)."""

  def objective(k_keep, cond, codes):
    def loss(logits):
      nll = jnp.mean(image_token_nll(logits, codes, layout.cond_len, layout.n_image))
      pred = jnp.argmax(logits[:, layout.cond_len - 1 :, : layout.n_image], axis=-1)
      accuracy = jnp.mean((pred == codes).astype(jnp.float32))
      return nll, {'bits_per_token': nll / np.log(2.0), 'accuracy': accuracy}

    return model_inputs(cond, corrupt(k_keep, codes, pkeep, layout.n_image)), loss

  return _adamw_step(
    objective, model, layout, tx, schedule, frozen, drop_prob, state, frozen_params, batch
  )


def make_train_step(
  config, model, layout, tx, schedule, mesh, shardings, frozen=Frozen(), frozen_shardings=None
):
  """The sharded, donated train step `(state, frozen_params, batch) -> (state, metrics)`."""
  if layout.transformer_kind == 'maskgit':
    step, option = maskgit_train_step, float(config.transformer.get('label_smoothing', 0.0))
  else:
    step, option = train_step, float(config.transformer.pkeep)
  fn = functools.partial(
    step, model, layout, tx, schedule, frozen, option, float(config.cond.drop_prob)
  )
  rep = parallel.replicated(mesh)
  jitted = jax.jit(
    fn,
    in_shardings=(shardings, frozen_shardings or rep, parallel.batch_sharding(mesh)),
    out_shardings=(shardings, rep),
    donate_argnums=(0,),
  )
  return MeshFunction(jitted, mesh, parallel.axis_rules(config))


def fresh_train(config, model, layout, mesh, rng=None):
  """A freshly initialised state on `mesh` and its train step, `(state, step)`, for a model
  without frozen first stages (what benchmarks time; the trainer restores instead)."""
  tx, schedule = make_optimizer(config)
  shardings = gpt_state_shardings(model, tx, mesh)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  state = jax.jit(functools.partial(init_state, model, tx), out_shardings=shardings)(rng)
  return state, make_train_step(config, model, layout, tx, schedule, mesh, shardings)


def eval_step(model, layout: Layout, frozen: Frozen, params, frozen_params, batch):
  """Sums over the real (mask=True) examples: image-code NLL (nats), tokens, examples."""
  batch = encode_batch(frozen, frozen_params, batch)
  codes = batch['codes'].astype(jnp.int32)
  logits = model.apply({'params': params}, model_inputs(cond_tokens(layout, batch), codes))
  nll = image_token_nll(logits, codes, layout.cond_len, layout.n_image)
  w = batch['mask'].astype(jnp.float32)
  return {
    'nll': jnp.sum(jnp.sum(nll, axis=1) * w),
    'tokens': jnp.sum(w) * codes.shape[1],
    'examples': jnp.sum(w),
  }


def make_eval_step(
  model, layout, mesh, param_sh, frozen=Frozen(), frozen_shardings=None, rules=None
):
  rep = parallel.replicated(mesh)
  step = maskgit_eval_step if layout.transformer_kind == 'maskgit' else eval_step
  jitted = jax.jit(
    functools.partial(step, model, layout, frozen),
    in_shardings=(param_sh, frozen_shardings or rep, parallel.batch_sharding(mesh)),
    out_shardings=rep,
  )
  return MeshFunction(jitted, mesh, rules)


# ----------------------------------------------------------------------------------------
# MaskGIT
# ----------------------------------------------------------------------------------------

# The key of the held-out masks (folded with a hash of each example's codes).
EVAL_MASK_SEED = 1234


def random_mask(keys, n: int):
  """(B, n) bool masks, one per key (B,): ceil(cos(pi/2 r) n) positions (at least 1) chosen
  uniformly, r ~ U(0, 1). Each row depends on its key alone (the same on any mesh)."""

  def one(key):
    k_r, k_pos = jax.random.split(key)
    ratio = maskgit_lib.mask_ratio(jax.random.uniform(k_r, ()))
    count = jnp.clip(jnp.ceil(ratio * n), 1, n).astype(jnp.int32)
    # The `count` positions of smallest uniform score.
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_pos, (n,))))
    return rank < count

  return jax.vmap(one)(keys)


def codes_key(base, codes):
  """(B,) keys: `base` folded with a hash of each row of codes (B, N)."""
  n = codes.shape[1]
  weights = jnp.arange(1, n + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
  h = jnp.sum((codes.astype(jnp.uint32) + 1) * weights, axis=1)  # wraps mod 2^32
  return jax.vmap(lambda x: jax.random.fold_in(base, x))(h)


def maskgit_inputs(layout: Layout, cond, codes, mask):
  """MaskGIT's input: [cond | codes with the masked ones replaced by the [MASK] id]."""
  return jnp.concatenate([cond, jnp.where(mask, layout.mask_id, codes)], axis=1)


def masked_token_nll(logits, codes, mask, label_smoothing: float = 0.0):
  """(loss, nll): the label-smoothed cross-entropy and the plain NLL (nats), each the mean over
  the masked positions of the whole batch. logits (B, N, n_image) at the image positions."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, codes[..., None].astype(jnp.int32), axis=-1)[..., 0]
  smoothed = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  w = mask.astype(jnp.float32)
  denom = jnp.maximum(jnp.sum(w), 1.0)
  return jnp.sum(smoothed * w) / denom, jnp.sum(nll * w) / denom


def maskgit_train_step(
  model,
  layout: Layout,
  tx,
  schedule,
  frozen: Frozen,
  label_smoothing: float,
  drop_prob: float,
  state,
  frozen_params,
  batch,
):
  """One AdamW step of MaskGIT on a batch of codes (or images); returns (state, metrics)."""

  def objective(k_mask, cond, codes):
    mask = random_mask(jax.random.split(k_mask, codes.shape[0]), codes.shape[1])

    def loss(logits):
      logits = logits[:, layout.cond_len :]
      loss, nll = masked_token_nll(logits, codes, mask, label_smoothing)
      w = mask.astype(jnp.float32)
      hits = (jnp.argmax(logits, axis=-1) == codes).astype(jnp.float32)
      return loss, {
        'bits_per_token': nll / np.log(2.0),  # per masked code, without label smoothing
        'accuracy': jnp.sum(hits * w) / jnp.maximum(jnp.sum(w), 1.0),
        'mask_ratio': jnp.mean(w),
      }

    return maskgit_inputs(layout, cond, codes, mask), loss

  return _adamw_step(
    objective, model, layout, tx, schedule, frozen, drop_prob, state, frozen_params, batch
  )


def maskgit_eval_step(model, layout: Layout, frozen: Frozen, params, frozen_params, batch):
  """Sums over the real (mask=True) examples: the NLL (nats) of the masked codes, their
  number ('tokens') and the examples. The masks come from `codes_key` (see the docstring)."""
  batch = encode_batch(frozen, frozen_params, batch)
  codes = batch['codes'].astype(jnp.int32)
  mask = random_mask(codes_key(jax.random.PRNGKey(EVAL_MASK_SEED), codes), codes.shape[1])
  inputs = maskgit_inputs(layout, cond_tokens(layout, batch), codes, mask)
  logits = model.apply({'params': params}, inputs)[:, layout.cond_len :]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, codes[..., None], axis=-1)[..., 0]
  w = mask.astype(jnp.float32) * batch['mask'].astype(jnp.float32)[:, None]
  return {
    'nll': jnp.sum(nll * w),
    'tokens': jnp.sum(w),
    'examples': jnp.sum(batch['mask'].astype(jnp.float32)),
  }
