"""Stage 2: the conditional GPT over frozen VQGAN codes (taming's Net2NetTransformer).

A training example is the token sequence `[condition | image codes]`:

* condition: one SOS token (unconditional), the class as one token (class-conditional), or
  the codes of a second frozen VQGAN over a depth / segmentation map (spatial);
* image codes: the stage-1 VQGAN's code grid, flattened row-major.

The GPT runs on the sequence minus its last token; the outputs at positions
[cond_len - 1, end) predict the image codes, and only those positions are scored (mean
cross-entropy over the image codes, as the original). With `pkeep < 1` each *input* image
token is replaced by a uniformly random code with probability 1 - pkeep; targets stay clean.

Vocabulary: see `configs/common_transformer.py`. Either way the softmax of the loss, and the
sampler, only range over the n_image image codes: with the original's shared table (vocab =
n_image) this is exactly its loss; with the offset convention condition ids can never be
predicted or sampled.

Optimizer: AdamW(0.9, 0.95), weight decay on Dense kernels only, lr = base_lr x global batch
(taming's rule) with optional warm-up and cosine decay. Parameters and optimizer state are
sharded by the GPT's logical axes under `config.logical_axis_rules` on the
`parallel.make_mesh` ('data', 'fsdp', 'tensor') mesh; the batch is split over data x fsdp.

Parameter layout: training runs with `scan_layers=True` by default (stacked `blocks`, 2x
faster on CPU) and checkpoints that layout as is (the optimizer state mirrors it; no copy at
save time). The run's config records it (`transformer.scan_layers`); restoring for sampling
or fine-tuning reads it from the saved config and converts (`restore_gpt_params`).
"""

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqgan_jax import checkpoints
from vqgan_jax import parallel
from vqgan_jax.models import transformer as tf
from vqgan_jax.models.vqgan import VQGAN
from vqgan_jax.validate import ConfigError

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
COND_KINDS = ('unconditional', 'class', 'spatial')

# Fields that change the shapes or meaning of a stage-2 checkpoint's arrays.
COMPATIBILITY_FIELDS = (
    'stage', 'transformer.vocab_size', 'transformer.block_size', 'transformer.n_layer',
    'transformer.n_head', 'transformer.n_embd', 'transformer.shared_vocab',
    'transformer.scan_layers', 'cond.kind', 'cond.n_classes', 'stage1_config.n_embed')

# Stage-1 model fields that must agree between a config and the stage-1 checkpoint.
_STAGE1_MODEL_FIELDS = ('ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'resolution',
                        'in_channels', 'out_ch', 'z_channels', 'n_embed', 'embed_dim',
                        'quantizer')


# ----------------------------------------------------------------------------------------
# Config resolution: stage-1 fields from the checkpoint, vocabulary and block size
# ----------------------------------------------------------------------------------------

def _check(cond, msg):
  if not cond:
    raise ConfigError(msg)


def saved_stage1_config(workdir):
  """The config saved with a stage-1 run's latest checkpoint, or None if it has none."""
  if not workdir or not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    return None
  ckpt = checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None)
  try:
    if ckpt.latest_step() is None:
      return None
    return ckpt.restore_config()
  finally:
    ckpt.close()


def _norm(v):
  return list(v) if isinstance(v, (tuple, list)) else v


def _merge_model_fields(fields, saved, field_name, workdir):
  """Checks `fields` (a ConfigDict of model fields) against a saved stage-1 config."""
  if saved.get('stage', 'vqgan') != 'vqgan':
    raise ConfigError(f'{field_name}: {workdir} is a {saved.get("stage")!r} run, not a '
                      'stage-1 (vqgan) run')
  model = saved.get('model', {})
  conflicts = []
  for k, v in model.items():
    if k not in fields or fields[k] is None:
      with fields.ignore_type():
        fields[k] = tuple(v) if isinstance(v, list) else v
    elif k in _STAGE1_MODEL_FIELDS and _norm(fields[k]) != _norm(v):
      conflicts.append(f'{field_name}.{k}={fields[k]!r} but the checkpoint in {workdir} has '
                       f'{tuple(v) if isinstance(v, list) else v!r}')
  if conflicts:
    raise ConfigError('; '.join(conflicts) + ' (drop the override or point the workdir at the '
                      'matching stage-1 run)')


def resolve_config(config):
  """An unlocked copy of a stage-2 config with the stage-1 (and cond) model fields checked
  against / filled from their checkpoints' saved configs, and `transformer.vocab_size` and
  `transformer.block_size` resolved."""
  c = ml_collections.ConfigDict(config.to_dict())
  _check(c.get('stage') == 'transformer',
         f"config.stage={c.get('stage')!r}: stage-2 runs need stage='transformer'")
  saved = saved_stage1_config(c.stage1_workdir)
  if saved is not None:
    _merge_model_fields(c.stage1_config, saved, 'config.stage1_config', c.stage1_workdir)
  if c.cond.kind == 'spatial' and not c.cond.random_init:
    saved = saved_stage1_config(c.cond.workdir)
    if saved is not None:
      _merge_model_fields(c.cond.model, saved, 'config.cond.model', c.cond.workdir)
  layout = _layout_from(c)
  c.transformer.vocab_size = layout.vocab_size
  c.transformer.block_size = layout.block_size
  return c


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each token of a sequence comes from and which ids it uses (static, hashable)."""
  kind: str
  n_image: int            # image codebook size: image codes are ids [0, n_image)
  grid: tuple             # image code grid (h, w)
  cond_len: int           # condition tokens per sequence
  cond_offset: int        # added to class ids / cond codes (0: shared table)
  sos_id: int             # unconditional SOS id
  null_id: int            # class dropout / guidance id; -1: none
  n_classes: int
  cond_grid: tuple        # spatial: the cond code grid; else ()
  cond_n_embed: int       # spatial: the cond VQGAN's codebook size; else 0
  vocab_size: int
  block_size: int

  @property
  def image_len(self):
    return self.grid[0] * self.grid[1]

  @property
  def seq_len(self):
    """The GPT's input length: cond + image - 1 (the last code is never an input)."""
    return self.cond_len + self.image_len - 1


def downsample_factor(model_fields):
  return 2 ** (len(model_fields.ch_mult) - 1)


def _grid(size, model_fields, field):
  f = downsample_factor(model_fields)
  _check(size % f == 0, f'config.data.image_size={size} is not divisible by the downsampling '
         f'factor {f} of {field}.ch_mult={tuple(model_fields.ch_mult)}')
  return (size // f, size // f)


def _layout_from(c):
  t, cond, m = c.transformer, c.cond, c.stage1_config
  _check(cond.kind in COND_KINDS, f'config.cond.kind={cond.kind!r}: use one of {COND_KINDS}')
  for k in ('n_embed', 'ch_mult'):
    _check(m.get(k) is not None, f'config.stage1_config.{k} is unset and {c.stage1_workdir!r} '
           '(config.stage1_workdir) has no checkpoint to read it from')
  n_image = int(m.n_embed)
  grid = _grid(c.data.image_size, m, 'config.stage1_config')
  shared = bool(t.shared_vocab)
  cond_grid, cond_n, null_id, n_classes = (), 0, -1, 0
  _check(0.0 <= cond.drop_prob < 1.0, f'config.cond.drop_prob={cond.drop_prob} not in [0, 1)')
  _check(cond.kind == 'class' or cond.drop_prob == 0.0,
         'config.cond.drop_prob (classifier-free guidance) needs cond.kind=class')
  if cond.kind == 'unconditional':
    cond_len = 1
    offset = 0 if shared else n_image
    sos = int(cond.sos_token) if shared else n_image
    needed = max(n_image, sos + 1)
  elif cond.kind == 'class':
    n_classes = int(cond.n_classes)
    _check(n_classes >= 1, 'config.cond.n_classes must be >= 1 for cond.kind=class')
    cond_len, sos = 1, -1
    offset = 0 if shared else n_image
    if cond.drop_prob > 0:
      _check(not shared, 'config.cond.drop_prob > 0 needs the offset vocabulary '
             '(transformer.shared_vocab=False): the shared table has no free null token')
      null_id = n_image + n_classes
    needed = max(n_image, n_classes) if shared else n_image + n_classes + (null_id >= 0)
  else:
    cm = cond.model
    _check(cm.get('n_embed') is not None, 'config.cond.model.n_embed is unset')
    _check(cond.key, 'config.cond.key (the dataset feature of the cond map) is empty')
    cond_grid = _grid(c.data.image_size, cm, 'config.cond.model')
    cond_len, sos, cond_n = cond_grid[0] * cond_grid[1], -1, int(cm.n_embed)
    offset = 0 if shared else n_image
    needed = max(n_image, cond_n) if shared else n_image + cond_n
  vocab = int(t.vocab_size)
  if vocab == -1:
    vocab = needed
  _check(vocab >= needed, f'config.transformer.vocab_size={vocab} is too small: the '
         f'{"shared" if shared else "offset"} vocabulary of this config needs {needed}')
  block_needed = cond_len + grid[0] * grid[1] - 1
  block = int(t.block_size)
  if block == -1:
    block = block_needed
  _check(block >= block_needed, f'config.transformer.block_size={block} is too small: '
         f'{cond_len} condition + {grid[0]}x{grid[1]} image tokens need {block_needed}')
  return Layout(kind=cond.kind, n_image=n_image, grid=grid, cond_len=cond_len,
                cond_offset=offset, sos_id=sos, null_id=null_id, n_classes=n_classes,
                cond_grid=cond_grid, cond_n_embed=cond_n, vocab_size=vocab, block_size=block)


def make_layout(config) -> Layout:
  """The layout of a resolved config (see `resolve_config`)."""
  return _layout_from(config)


def validate_config(config, batch_divisor: int = 1):
  t, o, tr = config.transformer, config.optim, config.train
  _check(t.n_embd % t.n_head == 0,
         f'config.transformer.n_embd={t.n_embd} is not divisible by n_head={t.n_head}')
  for name in ('n_layer', 'n_head', 'n_embd'):
    _check(t[name] >= 1, f'config.transformer.{name} must be >= 1, got {t[name]}')
  _check(0.0 <= t.pkeep <= 1.0, f'config.transformer.pkeep={t.pkeep} not in [0, 1]')
  _check(tr.dtype in DTYPES, f"config.train.dtype must be one of {tuple(DTYPES)}, got "
         f'{tr.dtype!r}')
  from vqgan_jax.models.layers import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
  _check(t.get('remat', 'none') in REMAT_MODES + REMAT_POLICIES,
         f'config.transformer.remat must be one of {REMAT_MODES} (or a policy name), got '
         f'{t.get("remat")!r}')
  _check(t.get('remat_policy', 'nothing_saveable') in REMAT_POLICIES,
         f'config.transformer.remat_policy must be one of {REMAT_POLICIES}, got '
         f'{t.get("remat_policy")!r}')
  parallel.axis_rules(config)
  for name in ('batch_size', 'eval_batch_size'):
    _check(tr[name] % batch_divisor == 0,
           f'config.train.{name}={tr[name]} is not divisible by the {batch_divisor} devices '
           "of the mesh's batch axes (config.mesh.data x config.mesh.fsdp)")
  for name in ('num_steps', 'log_every', 'eval_every', 'checkpoint_every'):
    _check(tr[name] >= 1, f'config.train.{name} must be >= 1, got {tr[name]}')
  _check(math.isfinite(o.base_lr) and o.base_lr > 0,
         f'config.optim.base_lr must be a positive number, got {o.base_lr}')
  _check(o.schedule in ('constant', 'cosine'),
         f"config.optim.schedule must be 'constant' or 'cosine', got {o.schedule!r}")
  _check(0 <= o.warmup_steps and (o.schedule != 'cosine' or o.warmup_steps < tr.num_steps),
         f'config.optim.warmup_steps={o.warmup_steps} must be in [0, train.num_steps)')
  _check(config.data.source in ('codes', 'images'),
         f"config.data.source must be 'codes' or 'images', got {config.data.source!r}")
  if config.cond.kind == 'spatial':
    want = int(config.cond.one_hot) or 1  # label maps one-hot; other maps (depth) gray
    _check(config.cond.model.in_channels == want,
           f'config.cond.model.in_channels={config.cond.model.in_channels} but the cond maps '
           f'have {want} channel(s) (config.cond.one_hot={config.cond.one_hot})')
  _check(config.data.source == 'codes' or config.cond.kind != 'spatial',
         "spatial conditioning trains on codes: use config.data.source='codes' "
         '(write them with --mode=encode)')


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------

class CodeGPT(tf.GPT):
  """The GPT whose sampled tokens are image codes: `decode` (what the samplers run) pushes
  the logits of ids >= n_image (condition tokens of the offset vocabulary) to -1e9, which a
  softmax turns into exactly 0 and guidance's difference keeps finite."""
  n_image: int = 0

  def decode(self, tokens, cache, pos, logits_at=None):
    logits, cache = super().decode(tokens, cache, pos, logits_at)
    if 0 < self.n_image < self.vocab_size:
      logits = jnp.where(jnp.arange(self.vocab_size) < self.n_image, logits, -1e9)
    return logits, cache


REMAT_MODES = ('', 'none', 'block', 'full')


def gpt_remat(t):
  """`GPT.remat` from `config.transformer`: False, True (nothing saved) or a policy name.

  remat: 'none' (or '') off; 'block' each block under nn.remat with `remat_policy`; 'full'
  nothing saved; a policy name alone is 'block' with that policy (the older spelling).
  """
  remat = t.get('remat', 'none')
  if remat in ('', 'none'):
    return False
  if remat == 'full':
    return True
  policy = t.get('remat_policy', 'nothing_saveable') if remat == 'block' else remat
  return True if policy == 'nothing_saveable' else policy


def build_model(config, layout: Layout, scan_layers=None) -> CodeGPT:
  t = config.transformer
  remat = gpt_remat(t)
  return CodeGPT(
      vocab_size=layout.vocab_size, block_size=layout.block_size, n_layer=t.n_layer,
      n_head=t.n_head, n_embd=t.n_embd, embd_pdrop=t.embd_pdrop, resid_pdrop=t.resid_pdrop,
      attn_pdrop=t.attn_pdrop, dtype=DTYPES[config.train.dtype], remat=remat,
      scan_layers=t.scan_layers if scan_layers is None else scan_layers,
      n_image=layout.n_image)


def build_vqgan(fields, dtype=jnp.float32) -> VQGAN:
  """A (frozen) VQGAN from stage-1 `model` fields."""
  return VQGAN(ch=fields.ch, ch_mult=tuple(fields.ch_mult), num_res_blocks=fields.num_res_blocks,
               attn_resolutions=tuple(fields.attn_resolutions), resolution=fields.resolution,
               in_channels=fields.in_channels, out_ch=fields.out_ch,
               z_channels=fields.z_channels, n_embed=fields.n_embed,
               embed_dim=fields.embed_dim, quantizer=fields.get('quantizer', 'vq'),
               kl_weight=fields.get('kl_weight', 1e-8),
               temperature=fields.get('temperature', 1.0), dropout=0.0, dtype=dtype)


class Frozen(NamedTuple):
  """The frozen encoders a step needs (None where the batch already holds codes)."""
  stage1: Any = None        # VQGAN: images -> image codes
  cond: Any = None          # VQGAN: cond maps -> cond codes
  cond_one_hot: int = 0     # > 0: cond maps are label maps, one-hot encoded


def image_codes(vqgan, params, images):
  """uint8 NHWC images -> (B, h*w) int32 codes, row-major."""
  x = images.astype(jnp.float32) / 127.5 - 1.0
  idx = vqgan.apply({'params': params}, x, method='encode_to_indices')
  return idx.reshape(idx.shape[0], -1).astype(jnp.int32)


def cond_map_codes(vqgan, params, cond_map, one_hot: int):
  """Cond maps -> (B, hc*wc) int32 codes: label maps (B, S, S) one-hot encoded (taming's
  segmentation VQGAN input), or uint8 maps (B, S, S, C) scaled to [-1, 1] (depth)."""
  if one_hot:
    x = jax.nn.one_hot(cond_map.astype(jnp.int32), one_hot, dtype=jnp.float32)
  else:
    x = cond_map.astype(jnp.float32) / 127.5 - 1.0
  idx = vqgan.apply({'params': params}, x, method='encode_to_indices')
  return idx.reshape(idx.shape[0], -1).astype(jnp.int32)


def encode_batch(frozen: Frozen, frozen_params, batch):
  """Adds 'codes' (and 'cond_codes') to a batch of images (and cond maps) with the frozen
  encoders, as --mode=encode stores them; a batch that has them passes through."""
  batch = dict(batch)
  if 'codes' not in batch:
    batch['codes'] = jax.lax.stop_gradient(
        image_codes(frozen.stage1, frozen_params['stage1'], batch['image']))
  if 'cond_codes' not in batch and frozen.cond is not None and 'cond_map' in batch:
    batch['cond_codes'] = jax.lax.stop_gradient(cond_map_codes(
        frozen.cond, frozen_params['cond'], batch['cond_map'], frozen.cond_one_hot))
  return batch


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


def class_tokens(layout: Layout, labels):
  """Condition ids for sampling: class ids (class models) or SOS (unconditional)."""
  labels = jnp.asarray(labels, jnp.int32).reshape(-1, 1)
  if layout.kind == 'unconditional':
    return jnp.full_like(labels, layout.sos_id)
  return labels + layout.cond_offset


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
  lg = logits[:, cond_len - 1:, :n_image].astype(jnp.float32)
  picked = jnp.take_along_axis(lg, codes[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jax.nn.logsumexp(lg, axis=-1) - picked


# ----------------------------------------------------------------------------------------
# Optimizer and state
# ----------------------------------------------------------------------------------------

def _key_name(k):
  return str(getattr(k, 'key', getattr(k, 'name', k)))


def decay_mask(params):
  """True for Dense kernels (key/query/value/proj, mlp, head): taming decays `nn.Linear`
  weights only; biases, LayerNorm, tok_emb and pos_emb are not decayed."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _key_name(path[-1]) == 'kernel',
                                          params)


def peak_learning_rate(config) -> float:
  """taming's main.py: lr = accumulate * n_gpus * per-GPU batch * base_lr = global batch * base."""
  if config.optim.scale_lr:
    return config.optim.base_lr * config.train.batch_size
  return config.optim.base_lr


def learning_rate_schedule(config):
  o = config.optim
  peak = peak_learning_rate(config)
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if o.warmup_steps else peak, peak_value=peak,
        warmup_steps=o.warmup_steps, decay_steps=config.train.num_steps,
        end_value=peak * o.final_lr_fraction)
  if not o.warmup_steps:
    return optax.constant_schedule(peak)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, o.warmup_steps), optax.constant_schedule(peak)],
      [o.warmup_steps])


def make_optimizer(config):
  """(tx, schedule): AdamW(b1, b2) with decoupled weight decay on kernels only."""
  o = config.optim
  schedule = learning_rate_schedule(config)
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                   mask=decay_mask)
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, schedule


def init_params(model, rng, boxed=False):
  params = model.init(rng, jnp.zeros((1, 1), jnp.int32))['params']
  return params if boxed else nn.unbox(params)


def init_state(model, tx, rng):
  """The training state as a plain dict pytree (what the checkpoints hold)."""
  k_init, k_run = jax.random.split(rng)
  params = init_params(model, k_init)
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
          'rng': k_run}


def _rules(rules):
  """The logical-axis rules to apply: a config's table (`parallel.axis_rules(config)`);
  None: the GPT's own `DEFAULT_RULES` (standalone use; every run passes its config's)."""
  return tf.DEFAULT_RULES if rules is None else parallel.normalize_rules(rules)


def param_shardings(model, mesh, rng=None, rules=None):
  """NamedShardings of the GPT params from their logical axes under `rules` on `mesh`."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  boxed = jax.eval_shape(functools.partial(init_params, model, boxed=True), rng)
  return tf.logical_shardings(boxed, mesh, _rules(rules))


def state_shardings(model, tx, mesh, rng=None, rules=None):
  """Shardings of the state: params by logical axes, optimizer moments like their params,
  scalars replicated."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  rep = parallel.replicated(mesh)
  p_sh = param_shardings(model, mesh, rng, rules)
  abstract_params = jax.eval_shape(functools.partial(init_params, model), rng)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  o_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, p_sh, transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return {'step': rep, 'params': p_sh, 'opt_state': o_sh, 'rng': rep}


class MeshFunction:
  """A jitted function called (or lowered ahead of time) under the mesh and the logical-axis
  rules (the GPT's activation constraints resolve against them at trace time)."""

  def __init__(self, fn, mesh, rules=None):
    self.fn, self.mesh = fn, mesh
    self.rules = tf.mesh_rules(mesh, _rules(rules))

  def __call__(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.fn.lower(*args)


# ----------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------

def train_step(model, layout: Layout, tx, schedule, frozen: Frozen, pkeep: float,
               drop_prob: float, state, frozen_params, batch):
  """One AdamW step on a batch of codes (or images, encoded here); returns (state, metrics)."""
  step = state['step']
  rng = jax.random.fold_in(state['rng'], step)
  k_cond, k_keep, k_drop = jax.random.split(rng, 3)
  batch = encode_batch(frozen, frozen_params, batch)
  codes = batch['codes'].astype(jnp.int32)
  cond = cond_tokens(layout, batch, k_cond, drop_prob)
  inputs = model_inputs(cond, corrupt(k_keep, codes, pkeep, layout.n_image))
  deterministic = not (model.embd_pdrop or model.resid_pdrop or model.attn_pdrop)

  def loss_fn(params):
    logits = model.apply({'params': params}, inputs, deterministic=deterministic,
                         rngs={'dropout': k_drop})
    nll = image_token_nll(logits, codes, layout.cond_len, layout.n_image)
    return jnp.mean(nll), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  pred = jnp.argmax(logits[:, layout.cond_len - 1:, :layout.n_image], axis=-1)
  metrics = {
      'loss': loss, 'bits_per_token': loss / np.log(2.0),
      'accuracy': jnp.mean((pred == codes).astype(jnp.float32)),
      'grad_norm': optax.global_norm(grads), 'param_norm': optax.global_norm(params),
      'lr': schedule(step),
  }
  return dict(state, step=step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(config, model, layout, tx, schedule, mesh, shardings, frozen=Frozen(),
                    frozen_shardings=None):
  """The sharded, donated train step `(state, frozen_params, batch) -> (state, metrics)`."""
  fn = functools.partial(train_step, model, layout, tx, schedule, frozen,
                         float(config.transformer.pkeep), float(config.cond.drop_prob))
  rep = parallel.replicated(mesh)
  jitted = jax.jit(fn, in_shardings=(shardings, frozen_shardings or rep,
                                     parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, rep), donate_argnums=(0,))
  return MeshFunction(jitted, mesh, parallel.axis_rules(config))


def eval_step(model, layout: Layout, frozen: Frozen, params, frozen_params, batch):
  """Sums over the real (mask=True) examples: image-code NLL (nats), tokens, examples."""
  batch = encode_batch(frozen, frozen_params, batch)
  codes = batch['codes'].astype(jnp.int32)
  logits = model.apply({'params': params}, model_inputs(cond_tokens(layout, batch), codes))
  nll = image_token_nll(logits, codes, layout.cond_len, layout.n_image)
  w = batch['mask'].astype(jnp.float32)
  return {'nll': jnp.sum(jnp.sum(nll, axis=1) * w),
          'tokens': jnp.sum(w) * codes.shape[1], 'examples': jnp.sum(w)}


def make_eval_step(model, layout, mesh, param_sh, frozen=Frozen(), frozen_shardings=None,
                   rules=None):
  rep = parallel.replicated(mesh)
  jitted = jax.jit(functools.partial(eval_step, model, layout, frozen),
                   in_shardings=(param_sh, frozen_shardings or rep,
                                 parallel.batch_sharding(mesh)),
                   out_shardings=rep)
  return MeshFunction(jitted, mesh, rules)


# ----------------------------------------------------------------------------------------
# Restoring GPT params in either layout
# ----------------------------------------------------------------------------------------

def restore_gpt_params(workdir, model, mesh, saved_config=None, rules=None):
  """The latest params of a stage-2 run in `model`'s layout, sharded by logical axes.

  The checkpoint's layout is read from its saved config (`transformer.scan_layers`) and
  converted (`stack_layers` / `unstack_layers`) when it differs from `model.scan_layers`.
  """
  if saved_config is None:
    ckpt = checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None)
    try:
      saved_config = ckpt.restore_config()
    finally:
      ckpt.close()
  saved_scan = bool(saved_config.get('transformer', {}).get('scan_layers', False))
  saved_model = model.clone(scan_layers=saved_scan)
  sh = param_shardings(saved_model, mesh, rules=rules)
  abstract = jax.eval_shape(functools.partial(init_params, saved_model), jax.random.PRNGKey(0))
  params = checkpoints.restore_params(workdir, checkpoints.abstract_like(abstract, sh))
  if saved_scan != model.scan_layers:
    convert = tf.stack_layers if model.scan_layers else tf.unstack_layers
    params = jax.jit(convert, out_shardings=param_shardings(model, mesh, rules=rules))(params)
  return params
