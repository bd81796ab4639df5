"""The GPT family's loading layer (stage 2): configs resolved against the stage-1
checkpoints, the token layout they imply (`Layout`), their validation, the transformer they
describe (`build_model`: the GPT, `transformer.kind='gpt'`, the default; configs older than the
field are GPTs; or MaskGIT's bidirectional transformer, `'maskgit'`, both over the same codes),
its parameter shardings and restore (`restore_gpt_params`), and the frozen VQGANs that encode
its inputs (`load_frozen`, `encode_batch`).

A stage-2 config names its frozen first stage by workdir; the stage-1 model fields are checked
against (and missing ones filled from) that run's saved config, then the vocabulary and block
size follow from the conditioning (`config_base` explains the two vocabulary conventions).
The config part runs before anything is compiled, and a problem is one `ConfigError` sentence.
Nothing here imports `train/`.
"""

import dataclasses
import functools
import os
from typing import Any
from typing import NamedTuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vqgan_jax import checkpoints
from vqgan_jax import checks
from vqgan_jax import parallel
from vqgan_jax.kernels import dtype_choice
from vqgan_jax.models import maskgit as maskgit_lib
from vqgan_jax.models import quantizer as quantizer_lib
from vqgan_jax.models import transformer as gpt_lib
from vqgan_jax.models import vqgan as vqgan_lib
from vqgan_jax.models import vqgan_load
from vqgan_jax.validate import DTYPE_NAMES
from vqgan_jax.validate import DTYPES
from vqgan_jax.validate import ConfigError
from vqgan_jax.validate import check
from vqgan_jax.validate import validate_remat
from vqgan_jax.validate import validate_train_counts

COND_KINDS = ('unconditional', 'class', 'spatial')
TRANSFORMER_KINDS = ('gpt', 'maskgit')

# Fields that change the shapes or meaning of a stage-2 checkpoint's arrays.
COMPATIBILITY_FIELDS = (
  'stage',
  'transformer.kind',
  'transformer.vocab_size',
  'transformer.block_size',
  'transformer.n_layer',
  'transformer.n_head',
  'transformer.n_embd',
  'transformer.shared_vocab',
  'transformer.scan_layers',
  'cond.kind',
  'cond.n_classes',
  'stage1_config.n_embed',
)

# Stage-1 model fields that must agree between a config and the stage-1 checkpoint.
_STAGE1_MODEL_FIELDS = (
  'ch',
  'ch_mult',
  'num_res_blocks',
  'attn_resolutions',
  'resolution',
  'in_channels',
  'out_ch',
  'z_channels',
  'n_embed',
  'embed_dim',
  # The quantizer and its options that change which code a latent gets (issue 13).
  *quantizer_lib.code_fields(),
)


def saved_stage1_config(workdir):
  """The config saved with a stage-1 run's latest checkpoint, or None if it has none."""
  if not workdir or not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    return None
  with checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None) as ckpt:
    return None if ckpt.latest_step() is None else ckpt.restore_config()


def _norm(v):
  return list(v) if isinstance(v, (tuple, list)) else v


def _merge_model_fields(fields, saved, field_name, workdir):
  """Checks `fields` (a ConfigDict of model fields) against a saved stage-1 config."""
  if saved.get('stage', 'vqgan') != 'vqgan':
    raise ConfigError(
      f'{field_name}: {workdir} is a {saved.get("stage")!r} run, not a stage-1 (vqgan) run'
    )
  model = saved.get('model', {})
  conflicts = []
  for k, v in model.items():
    if k not in fields or fields[k] is None:
      with fields.ignore_type():
        fields[k] = tuple(v) if isinstance(v, list) else v
    elif k in _STAGE1_MODEL_FIELDS and _norm(fields[k]) != _norm(v):
      conflicts.append(
        f'{field_name}.{k}={fields[k]!r} but the checkpoint in {workdir} has '
        f'{tuple(v) if isinstance(v, list) else v!r}'
      )
  if conflicts:
    raise ConfigError(
      '; '.join(conflicts) + ' (drop the override or point the workdir at the matching stage-1 run)'
    )


def resolve_config(config):
  """An unlocked copy of a stage-2 config with the stage-1 (and cond) model fields checked
  against / filled from their checkpoints' saved configs, and `transformer.vocab_size` and
  `transformer.block_size` resolved."""
  c = ml_collections.ConfigDict(config.to_dict())
  check(
    c.get('stage') == 'transformer',
    f"config.stage={c.get('stage')!r}: stage-2 runs need stage='transformer'",
  )
  # A config file written before the rename (saved configs are upgraded as they are read).
  check(
    'steps' not in c.get('sample', {}),
    "config.sample.steps is now config.sample.iterations (MaskGIT's decoding iterations)",
  )
  # Absolute, so that the saved config finds its first stage from any working directory.
  if c.stage1_workdir:
    c.stage1_workdir = os.path.abspath(c.stage1_workdir)
  if c.cond.workdir:
    c.cond.workdir = os.path.abspath(c.cond.workdir)
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
  n_image: int  # image codebook size: image codes are ids [0, n_image)
  grid: tuple  # image code grid (h, w)
  cond_len: int  # condition tokens per sequence
  cond_offset: int  # added to class ids / cond codes (0: shared table)
  sos_id: int  # unconditional SOS id
  null_id: int  # class dropout / guidance id; -1: none
  n_classes: int
  cond_grid: tuple  # spatial: the cond code grid; else ()
  cond_n_embed: int  # spatial: the cond VQGAN's codebook size; else 0
  vocab_size: int
  block_size: int
  transformer_kind: str = 'gpt'  # config.transformer.kind
  mask_id: int = -1  # maskgit: the [MASK] id (the last id of the vocabulary); gpt: -1
  # The code grid of a whole image (what --mode=encode writes); `grid` is a window of it when
  # stage 2 trains on crops (config.data.crop_codes), else equal. (): equal.
  code_grid: tuple = ()

  @property
  def crop(self):
    """(the whole code grid, the window) when stage 2 trains on crops of it, else None."""
    full = tuple(self.code_grid or self.grid)
    return None if full == tuple(self.grid) else (full, self.grid[0])

  @property
  def sample_grid(self):
    """The grid sampled when config.sample.grid_h/grid_w are 0: the whole image's (a GPT
    trained on crops draws it with the sliding window); MaskGIT's training grid."""
    return tuple(self.grid if self.transformer_kind == 'maskgit' else self.code_grid or self.grid)

  @property
  def image_len(self):
    return self.grid[0] * self.grid[1]

  @property
  def seq_len(self):
    """The transformer's input length: the GPT's cond + image - 1 (the last code is never an
    input); MaskGIT's cond + image."""
    return self.cond_len + self.image_len - (self.transformer_kind == 'gpt')


def downsample_factor(model_fields):
  return 2 ** (len(model_fields.ch_mult) - 1)


def _grid(size, model_fields, field):
  f = downsample_factor(model_fields)
  check(
    size % f == 0,
    f'config.data.image_size={size} is not divisible by the downsampling '
    f'factor {f} of {field}.ch_mult={tuple(model_fields.ch_mult)}',
  )
  return (size // f, size // f)


def _crop_grid(c, code_grid):
  """The grid stage 2 trains on: config.data.crop_codes x crop_codes windows of the code grid
  (random per example and epoch in training, centred in eval), or the whole grid (0)."""
  # .get: config files that set `data` to a stage-1 section (the paper's) have no such field.
  crop = c.data.get('crop_codes', 0)
  if not crop:
    return code_grid
  check(
    isinstance(crop, int) and 1 <= crop <= min(code_grid),
    f'config.data.crop_codes={crop!r} must be 0 (the whole grid) or in [1, {min(code_grid)}]: '
    f'a window of the {code_grid[0]}x{code_grid[1]} code grid of '
    f'config.data.image_size={c.data.image_size}',
  )
  check(
    c.data.source == 'codes',
    f"config.data.crop_codes={crop} crops the codes dataset: it needs config.data.source='codes', "
    f'got {c.data.source!r}',
  )
  check(
    c.cond.kind != 'spatial',
    f'config.data.crop_codes={crop}: crops of a spatially conditioned model are not supported '
    '(its cond grid would need the same crop); set it to 0',
  )
  return (crop, crop)


def transformer_kind(config):
  """config.transformer.kind, 'gpt' for configs written before the field existed."""
  return config.transformer.get('kind', 'gpt')


def _layout_from(c):
  t, cond, m = c.transformer, c.cond, c.stage1_config
  check(cond.kind in COND_KINDS, f'config.cond.kind={cond.kind!r}: use one of {COND_KINDS}')
  kind = transformer_kind(c)
  check(
    kind in TRANSFORMER_KINDS,
    f'config.transformer.kind={kind!r}: use one of {TRANSFORMER_KINDS}',
  )
  maskgit = kind == 'maskgit'
  for k in ('n_embed', 'ch_mult'):
    check(
      m.get(k) is not None,
      f'config.stage1_config.{k} is unset and {c.stage1_workdir!r} '
      '(config.stage1_workdir) has no checkpoint to read it from',
    )
  n_image = int(m.n_embed)
  code_grid = _grid(c.data.image_size, m, 'config.stage1_config')
  grid = _crop_grid(c, code_grid)
  shared = bool(t.shared_vocab)
  check(0.0 <= cond.drop_prob < 1.0, f'config.cond.drop_prob={cond.drop_prob} not in [0, 1)')
  check(
    cond.kind == 'class' or cond.drop_prob == 0.0,
    'config.cond.drop_prob (classifier-free guidance) needs cond.kind=class',
  )
  ids, needed = _condition_ids(c, n_image, shared)
  needed += maskgit  # MaskGIT's [MASK] id: the last id
  vocab = _at_least(
    t.vocab_size,
    needed,
    'vocab_size',
    f'the {"shared" if shared else "offset"} vocabulary of this config needs {needed}'
    + (' (with the [MASK] id)' if maskgit else ''),
  )
  # The GPT never reads the last code; MaskGIT reads the whole sequence.
  block_needed = ids['cond_len'] + grid[0] * grid[1] - (not maskgit)
  block = _at_least(
    t.block_size,
    block_needed,
    'block_size',
    f'{ids["cond_len"]} condition + {grid[0]}x{grid[1]} image tokens need {block_needed}',
  )
  return Layout(
    kind=cond.kind,
    n_image=n_image,
    grid=grid,
    cond_offset=0 if shared else n_image,
    **ids,
    vocab_size=vocab,
    block_size=block,
    transformer_kind=kind,
    mask_id=vocab - 1 if maskgit else -1,
    code_grid=code_grid,
  )


def _condition_ids(c, n_image, shared):
  """The condition's part of the layout (cond_len, sos_id, null_id, n_classes, cond_grid,
  cond_n_embed) and the vocabulary size it needs, per config.cond.kind."""
  cond = c.cond
  ids = dict(cond_len=1, sos_id=-1, null_id=-1, n_classes=0, cond_grid=(), cond_n_embed=0)
  if cond.kind == 'unconditional':
    ids['sos_id'] = sos = int(cond.sos_token) if shared else n_image
    return ids, max(n_image, sos + 1)
  if cond.kind == 'class':
    ids['n_classes'] = n_classes = int(cond.n_classes)
    check(n_classes >= 1, 'config.cond.n_classes must be >= 1 for cond.kind=class')
    if cond.drop_prob > 0:
      check(
        not shared,
        'config.cond.drop_prob > 0 needs the offset vocabulary '
        '(transformer.shared_vocab=False): the shared table has no free null token',
      )
      ids['null_id'] = n_image + n_classes
    needed = max(n_image, n_classes) if shared else n_image + n_classes + (ids['null_id'] >= 0)
    return ids, needed
  cm = cond.model
  check(cm.get('n_embed') is not None, 'config.cond.model.n_embed is unset')
  check(cond.key, 'config.cond.key (the dataset feature of the cond map) is empty')
  ids['cond_grid'] = cond_grid = _grid(c.data.image_size, cm, 'config.cond.model')
  ids['cond_n_embed'] = cond_n = int(cm.n_embed)
  ids['cond_len'] = cond_grid[0] * cond_grid[1]
  return ids, max(n_image, cond_n) if shared else n_image + cond_n


def _at_least(value, needed, field, needs):
  """config.transformer.<field>: -1 is `needed`; less is refused, saying what `needs` it."""
  value = int(value)
  if value == -1:
    return needed
  check(value >= needed, f'config.transformer.{field}={value} is too small: {needs}')
  return value


def make_layout(config) -> Layout:
  """The layout of a resolved config (see `resolve_config`)."""
  return _layout_from(config)


def validate_config(config, batch_divisor: int = 1):
  t, o, tr = config.transformer, config.optim, config.train
  check(
    t.n_embd % t.n_head == 0,
    f'config.transformer.n_embd={t.n_embd} is not divisible by n_head={t.n_head}',
  )
  for name in ('n_layer', 'n_head', 'n_embd'):
    check(t[name] >= 1, f'config.transformer.{name} must be >= 1, got {t[name]}')
  check(0.0 <= t.pkeep <= 1.0, f'config.transformer.pkeep={t.pkeep} not in [0, 1]')
  smoothing = t.get('label_smoothing', 0.0)
  if transformer_kind(config) == 'maskgit':
    check(
      t.pkeep == 1.0,
      f"config.transformer.pkeep={t.pkeep}: kind='maskgit' corrupts its inputs by masking; "
      "pkeep is the GPT's (set it to 1)",
    )
    check(
      0.0 <= smoothing < 1.0,
      f'config.transformer.label_smoothing={smoothing} not in [0, 1)',
    )
  else:
    check(
      smoothing == 0.0,
      f"config.transformer.label_smoothing={smoothing} applies to kind='maskgit' only "
      "(the GPT's loss is the original's; set it to 0)",
    )
  check(
    tr.dtype in DTYPE_NAMES, f'config.train.dtype must be one of {DTYPE_NAMES}, got {tr.dtype!r}'
  )
  validate_remat(t, 'config.transformer', REMAT_MODES, policy_as_mode=True)
  parallel.axis_rules(config)
  validate_train_counts(tr, o.base_lr, batch_divisor)
  check(
    o.schedule in ('constant', 'cosine'),
    f"config.optim.schedule must be 'constant' or 'cosine', got {o.schedule!r}",
  )
  check(
    0 <= o.warmup_steps and (o.schedule != 'cosine' or o.warmup_steps < tr.num_steps),
    f'config.optim.warmup_steps={o.warmup_steps} must be in [0, train.num_steps)',
  )
  check(
    config.data.source in ('codes', 'images'),
    f"config.data.source must be 'codes' or 'images', got {config.data.source!r}",
  )
  if config.cond.kind == 'spatial':
    want = int(config.cond.one_hot) or 1  # label maps one-hot; other maps (depth) gray
    check(
      config.cond.model.in_channels == want,
      f'config.cond.model.in_channels={config.cond.model.in_channels} but the cond maps '
      f'have {want} channel(s) (config.cond.one_hot={config.cond.one_hot})',
    )
  check(
    config.data.source == 'codes' or config.cond.kind != 'spatial',
    "spatial conditioning trains on codes: use config.data.source='codes' "
    '(write them with --mode=encode)',
  )


class CodeGPT(gpt_lib.GPT):
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


def build_model(config, layout: Layout, scan_layers=None):
  """The config's transformer: a `CodeGPT`, or a `MaskGIT` for transformer.kind='maskgit'."""
  t = config.transformer
  kw = dict(
    vocab_size=layout.vocab_size,
    block_size=layout.block_size,
    n_layer=t.n_layer,
    n_head=t.n_head,
    n_embd=t.n_embd,
    embd_pdrop=t.embd_pdrop,
    resid_pdrop=t.resid_pdrop,
    attn_pdrop=t.attn_pdrop,
    dtype=DTYPES[dtype_choice.resolve(config.train.dtype, 'transformer')],
    remat=gpt_remat(t),
    scan_layers=t.scan_layers if scan_layers is None else scan_layers,
    n_image=layout.n_image,
  )
  if layout.transformer_kind == 'maskgit':
    return maskgit_lib.MaskGIT(mask_id=layout.mask_id, **kw)
  return CodeGPT(**kw)


def setup(config):
  """(resolved config, mesh, layout) of a stage-2 run, validated for that mesh."""
  config = resolve_config(config)
  mesh = parallel.make_mesh(config.mesh)
  validate_config(config, parallel.batch_divisor(mesh))
  return config, mesh, make_layout(config)


class Frozen(NamedTuple):
  """The frozen encoders a step needs (None where the batch already holds codes)."""

  stage1: Any = None  # VQGAN: images -> image codes
  cond: Any = None  # VQGAN: cond maps -> cond codes
  cond_one_hot: int = 0  # > 0: cond maps are label maps, one-hot encoded
  stage1_id: Any = None  # `vqgan_load.tokenizer_identity` of the stage-1 params loaded


def load_frozen(config, layout: Layout, mesh, *, stage1=True, cond=True):
  """The frozen VQGANs of a resolved stage-2 config and their params on the mesh:
  (Frozen, params, shardings), keyed 'stage1' / 'cond'."""
  rules = parallel.axis_rules(config)
  models, params, shardings = {}, {}, {}
  stage1_id = None
  if stage1:
    if not config.stage1_workdir:
      raise ConfigError('config.stage1_workdir (the stage-1 run) is empty')
    models['stage1'] = vqgan_lib.from_config(config.stage1_config, frozen=True)
  if cond and layout.kind == 'spatial':
    models['cond'] = vqgan_lib.from_config(config.cond.model, frozen=True)
  for key, vqgan in models.items():
    if key == 'cond' and config.cond.random_init:
      logging.warning('config.cond.random_init: the cond VQGAN is randomly initialised')
      params[key] = vqgan_load.init_vqgan_params(
        vqgan, mesh, jax.random.PRNGKey(config.seed + 1), rules
      )
      shardings[key] = jax.tree.map(lambda x: x.sharding, params[key])
      continue
    workdir = config.stage1_workdir if key == 'stage1' else config.cond.workdir
    if not workdir:
      raise ConfigError(
        "config.cond.workdir (the cond VQGAN's stage-1 run) is empty; "
        'spatial conditioning needs a trained cond VQGAN'
      )
    params[key], read = vqgan_load.restore_vqgan_params(workdir, vqgan, mesh, rules, with_key=True)
    # The shardings it was restored into (`vqgan_param_shardings`), without tracing it again.
    shardings[key] = jax.tree.map(lambda x: x.sharding, params[key])
    if key == 'stage1':
      stage1_id = vqgan_load.tokenizer_identity(workdir, params[key], read)
  frozen = Frozen(
    stage1=models.get('stage1'),
    cond=models.get('cond'),
    cond_one_hot=int(config.cond.one_hot),
    stage1_id=stage1_id,
  )
  return frozen, params, shardings


def stage1_identity(config, layout: Layout, mesh):
  """The tokenizer identity of config.stage1_workdir's params (restored to hash them), or
  None when it names no run with a checkpoint (stage 2 on codes needs none)."""
  if vqgan_load.latest_step(config.stage1_workdir) is None:
    return None
  return load_frozen(config, layout, mesh, cond=False)[0].stage1_id


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
      image_codes(frozen.stage1, frozen_params['stage1'], batch['image'])
    )
  if 'cond_codes' not in batch and frozen.cond is not None and 'cond_map' in batch:
    batch['cond_codes'] = jax.lax.stop_gradient(
      cond_map_codes(frozen.cond, frozen_params['cond'], batch['cond_map'], frozen.cond_one_hot)
    )
  return batch


def class_tokens(layout: Layout, labels):
  """Condition ids for sampling: class ids (class models) or SOS (unconditional).

  Concrete labels of a class model are checked: an id outside [0, n_classes) would index
  another token of the vocabulary and give garbage codes.
  """
  if layout.kind == 'class':
    labels = checks.integers(labels, 'labels', 0, layout.n_classes, what='class ids')
  labels = jnp.asarray(labels, jnp.int32).reshape(-1, 1)
  if layout.kind == 'unconditional':
    return jnp.full_like(labels, layout.sos_id)
  return labels + layout.cond_offset


def init_params(model, rng, boxed=False):
  params = model.init(rng, jnp.zeros((1, 1), jnp.int32))['params']
  return params if boxed else nn.unbox(params)


def _rules(rules):
  """The logical-axis rules to apply: a config's table (`parallel.axis_rules(config)`);
  None: the GPT's own `DEFAULT_RULES` (standalone use; every run passes its config's)."""
  return parallel.DEFAULT_RULES if rules is None else parallel.normalize_rules(rules)


def param_shardings(model, mesh, rng=None, rules=None):
  """NamedShardings of the GPT params from their logical axes under `rules` on `mesh`."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  boxed = jax.eval_shape(functools.partial(init_params, model, boxed=True), rng)
  return parallel.logical_shardings(boxed, mesh, _rules(rules))


def restore_gpt_params(workdir, model, mesh, saved_config=None, rules=None, step=None):
  """The params of a stage-2 run (latest step by default) in `model`'s layout, sharded by
  logical axes; `model` is the run's GPT or MaskGIT (`build_model`).

  The checkpoint's layout is read from its saved config (`transformer.scan_layers`) and
  converted (`stack_layers` / `unstack_layers`) when it differs from `model.scan_layers`.
  """
  if saved_config is None:
    with checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None) as ckpt:
      saved_config = ckpt.restore_config(step)
  saved_scan = bool(saved_config.get('transformer', {}).get('scan_layers', False))
  saved_model = model.clone(scan_layers=saved_scan)
  sh = param_shardings(saved_model, mesh, rules=rules)
  abstract = jax.eval_shape(functools.partial(init_params, saved_model), jax.random.PRNGKey(0))
  params = checkpoints.restore_params(workdir, checkpoints.abstract_like(abstract, sh), step=step)
  if saved_scan != model.scan_layers:
    convert = gpt_lib.stack_layers if model.scan_layers else gpt_lib.unstack_layers
    params = jax.jit(convert, out_shardings=param_shardings(model, mesh, rules=rules))(params)
  return params
