"""A taming yaml (`configs/model.yaml` of a release) -> our ml_collections config.

Stage 1 (VQModel, VQSegmentationModel, GumbelVQ): `stage1_config` fills
`config_base.stage1_base()` from the yaml's ddconfig, quantizer and lossconfig. Stage 2
(Net2NetTransformer): `stage2_config` fills `config_base.stage2_base()` with the GPT, its
first stage and its condition, in the original's conventions (shared vocabulary, per-layer
params). Fields the yaml leaves out take taming's constructor defaults, not ours.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

import numpy as np
import yaml  # a dependency of ml_collections

from vqgan_jax import config_base
from vqgan_jax.convert import ConversionError
from vqgan_jax.convert import param_mapping

VQMODEL_TARGETS = ('taming.models.vqgan.VQModel', 'taming.models.vqgan.VQSegmentationModel')
GUMBEL_TARGET = 'taming.models.vqgan.GumbelVQ'
NET2NET_TARGET = 'taming.models.cond_transformer.Net2NetTransformer'
VQLPIPS_TARGET = 'taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator'
COSINE_SCHEDULER = 'taming.lr_scheduler.LambdaWarmUpCosineScheduler'  # GumbelVQ's temperature


def load_yaml(path: str) -> dict:
  with open(path) as f:
    try:
      cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise ConversionError(f'{path} is not valid YAML ({str(e).splitlines()[0]})') from None
  if not isinstance(cfg, Mapping) or not isinstance(cfg.get('model'), Mapping):
    raise ConversionError(f'{path}: not a taming config (no top-level "model")')
  return dict(cfg)


def model_kind(target: str | None) -> str | None:
  """The model a yaml `target` describes, in `param_mapping.state_dict_kind`'s words; None
  for no target (the state dict decides) or one we do not convert."""
  if target in VQMODEL_TARGETS:
    return 'VQModel'
  return {GUMBEL_TARGET: 'GumbelVQ', NET2NET_TARGET: 'Net2NetTransformer'}.get(target)


# --------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------

_DDCONFIG_FIELDS = (
  'ch',
  'ch_mult',
  'num_res_blocks',
  'attn_resolutions',
  'resolution',
  'z_channels',
)


def model_fields(
  ddconfig: Mapping[str, Any],
  n_embed: int,
  embed_dim: int,
  *,
  quantizer: str = 'vq',
  kl_weight: float = 1e-8,
  temperature: float = 1.0,
) -> dict:
  """taming ddconfig + quantizer sizes (+ the quantizer kind: 'vq' for VQModel, 'gumbel' for
  GumbelVQ, with its kl_weight and training temperature) -> our stage-1 `model` fields, all
  those of the module (`vqgan.VQGAN(**fields)`)."""
  missing = [f for f in _DDCONFIG_FIELDS if f not in ddconfig]
  if missing:
    raise ConversionError(f'ddconfig lacks {missing}')
  if ddconfig.get('double_z', False):
    raise ConversionError('ddconfig.double_z=True is not a VQGAN (no taming VQModel uses it)')
  if not ddconfig.get('resamp_with_conv', True):
    raise ConversionError('ddconfig.resamp_with_conv=False is not supported')
  if ddconfig.get('give_pre_end', False):
    raise ConversionError('ddconfig.give_pre_end=True is not supported')
  # The base's values for the module's fields taming has no counterpart of (the original's
  # quantizer); restart_window is the train step's, not the module's.
  base = config_base.stage1_base().model.to_dict()
  del base['restart_window']
  return dict(
    base,
    ch=int(ddconfig['ch']),
    ch_mult=tuple(int(m) for m in ddconfig['ch_mult']),
    num_res_blocks=int(ddconfig['num_res_blocks']),
    attn_resolutions=tuple(int(r) for r in ddconfig['attn_resolutions']),
    resolution=int(ddconfig['resolution']),
    in_channels=int(ddconfig.get('in_channels', 3)),
    out_ch=int(ddconfig.get('out_ch', 3)),
    z_channels=int(ddconfig['z_channels']),
    n_embed=int(n_embed),
    embed_dim=int(embed_dim),
    quantizer=str(quantizer),
    kl_weight=float(kl_weight),
    temperature=float(temperature),
    dropout=float(ddconfig.get('dropout', 0.0)),
  )


def gumbel_temperature(scheduler_config: Mapping[str, Any] | None, step: int) -> float:
  """GumbelVQ's temperature at `step`: its `temperature_scheduler_config` (taming's
  LambdaWarmUpCosineScheduler: linear warm-up lr_start -> lr_max, cosine to lr_min at
  max_decay_steps) evaluated where the original would resume training; 1.0 (GumbelQuantize's
  temp_init, what a loaded model has before a training step) without a schedule."""
  if not scheduler_config:
    return 1.0
  target = scheduler_config.get('target')
  if target != COSINE_SCHEDULER:
    raise ConversionError(
      f'temperature_scheduler_config target {target!r} is not supported ({COSINE_SCHEDULER} is)'
    )
  p = scheduler_config.get('params', {})
  warm, start, top, low = (
    int(p['warm_up_steps']),
    float(p['lr_start']),
    float(p['lr_max']),
    float(p['lr_min']),
  )
  decay = int(p['max_decay_steps'])
  if step < warm:
    return (top - start) / warm * step + start
  t = min((step - warm) / (decay - warm), 1.0)
  return float(low + 0.5 * (top - low) * (1 + np.cos(t * np.pi)))


def quantizer_fields(
  target: str | None, model_params: Mapping[str, Any], sd=None, prefix: str = '', step: int = 0
) -> dict:
  """Our quantizer fields (quantizer, kl_weight, temperature) of a taming first-stage model:
  from its yaml target, or from the state dict's keys when the yaml has no target."""
  gumbel = target == GUMBEL_TARGET or (
    not target and sd is not None and bool(param_mapping.gumbel_keys(sd, prefix))
  )
  if not gumbel:
    return {'quantizer': 'vq'}
  if model_params.get('remap'):
    raise ConversionError('GumbelVQ with remap (a used-codes file) is not supported')
  return {
    'quantizer': 'gumbel',
    # GumbelVQ's constructor default (the release sets the same 1e-8).
    'kl_weight': float(model_params.get('kl_weight', 1e-8)),
    'temperature': gumbel_temperature(model_params.get('temperature_scheduler_config'), step),
  }


_LOSS_FIELDS = (
  'disc_start',
  'codebook_weight',
  'perceptual_weight',
  'disc_factor',
  'disc_weight',
  'disc_loss',
  'disc_num_layers',
  'disc_ndf',
)


def stage1_config(
  ddconfig: Mapping[str, Any],
  n_embed: int,
  embed_dim: int,
  lossconfig: Mapping[str, Any] | None = None,
  *,
  base_lr: float | None = None,
  batch_size: int | None = None,
  **quantizer,
):
  """Our stage-1 config (`config_base.stage1_base` schema) for a taming VQModel (or a
  GumbelVQ: `quantizer` holds `quantizer_fields`).

  `lossconfig` is the yaml's `{'target', 'params'}` (or just its params); taming's
  VQLPIPSWithDiscriminator defaults fill the fields it leaves out (disc_num_layers 3, ndf 64,
  disc_weight 1.0, ...).
  """
  c = config_base.stage1_base()
  c.model.update(**model_fields(ddconfig, n_embed, embed_dim, **quantizer))
  c.data.image_size = c.model.resolution
  lp = dict(lossconfig or {})
  # No lossconfig (a frozen stage of a Net2NetTransformer): nothing to read or check.
  target = lp.get('target', VQLPIPS_TARGET) if lossconfig is not None else None
  lp = dict(lp.get('params', {}) or {}) if 'target' in lp or 'params' in lp else lp
  # taming's constructor defaults, not ours: a yaml that omits a field got these.
  taming_defaults = dict(
    codebook_weight=1.0,
    perceptual_weight=1.0,
    disc_factor=1.0,
    disc_weight=1.0,
    disc_loss='hinge',
    disc_num_layers=3,
    disc_ndf=64,
  )
  if target == VQLPIPS_TARGET:
    for k in _LOSS_FIELDS:
      if k in lp:
        v = lp[k]
      elif k in taming_defaults:
        v = taming_defaults[k]
      else:
        continue
      c.loss[k] = type(c.loss[k])(v)
    for k in ('use_actnorm', 'disc_conditional'):
      if lp.get(k):
        raise ConversionError(f'lossconfig.params.{k}=True is not supported')
    if int(lp.get('disc_in_channels', 3)) != c.model.out_ch:
      raise ConversionError(
        f'disc_in_channels {lp.get("disc_in_channels")} != out_ch {c.model.out_ch}'
      )
  if base_lr is not None:
    c.optim.base_lr = float(base_lr)
  if batch_size is not None:
    c.train.batch_size = int(batch_size)
  return c


def stage_model(stage_cfg: Mapping[str, Any]):
  """Our stage-1 `model` fields of a Net2NetTransformer's first/cond stage yaml entry (the
  quantizer's temperature is irrelevant there: the stages are frozen)."""
  p = stage_cfg['params']
  return stage1_config(
    p['ddconfig'], p['n_embed'], p['embed_dim'], **quantizer_fields(stage_cfg.get('target'), p)
  ).model


# --------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------


def net2net_cond_kind(cond_cfg) -> str:
  """The Net2NetTransformer's condition: 'is_unconditional', 'is_first_stage', 'sos',
  'class', 'coord', 'dummy', 'vqgan' (its own VQModel), or an unknown target as it is."""
  if cond_cfg in ('__is_unconditional__', '__is_first_stage__'):
    return cond_cfg.strip('_')
  target = (cond_cfg or {}).get('target', '')
  return {
    'taming.modules.util.SOSProvider': 'sos',
    'taming.modules.util.Labelator': 'class',
    'taming.modules.misc.coord.CoordStage': 'coord',
    'taming.models.dummy_cond_stage.DummyCondStage': 'dummy',
  }.get(target, 'vqgan' if target in VQMODEL_TARGETS + (GUMBEL_TARGET,) else target)


def gpt_fields(transformer_params: Mapping[str, Any]) -> dict:
  """The yaml's `transformer_config.params` -> our `transformer` size and dropout fields."""
  tp = transformer_params
  if int(tp.get('n_unmasked', 0)):
    raise ConversionError('transformer n_unmasked > 0 is not supported')
  return dict(
    vocab_size=int(tp['vocab_size']),
    block_size=int(tp['block_size']),
    n_layer=int(tp.get('n_layer', 12)),
    n_head=int(tp.get('n_head', 8)),
    n_embd=int(tp.get('n_embd', 256)),
    embd_pdrop=float(tp.get('embd_pdrop', 0.0)),
    resid_pdrop=float(tp.get('resid_pdrop', 0.0)),
    attn_pdrop=float(tp.get('attn_pdrop', 0.0)),
  )


def stage2_config(model_params: Mapping[str, Any], out_dir: str, base_lr=None):
  """Our stage-2 config (`config_base.stage2_base` schema) for a Net2NetTransformer whose
  first stage is converted to `out_dir/first_stage` (and its cond stage, when a VQModel of
  its own, to `out_dir/cond_stage`): taming's shared vocabulary, the per-layer params layout.
  What our schema has no field for is kept under `taming`."""
  cond_cfg = (
    '__is_unconditional__'
    if model_params.get('unconditional')
    else model_params.get('cond_stage_config')
  )
  kind = net2net_cond_kind(cond_cfg)
  fs_model = stage_model(model_params['first_stage_config'])
  c = config_base.stage2_base()
  c.stage1_workdir = os.path.join(out_dir, 'first_stage')
  c.stage1_config.update(fs_model.to_dict())
  # The original trains on crops of the first stage's resolution: code grid and block size
  # follow from it (the schema's default, 256, fits only f16 models at 256x256).
  c.data.image_size = fs_model.resolution
  c.transformer.update(
    **gpt_fields(model_params['transformer_config'].get('params', {})),
    pkeep=float(model_params.get('pkeep', 1.0)),
    shared_vocab=True,
    scan_layers=False,
  )
  c.cond.sos_token = int(model_params.get('sos_token', 0))
  c.cond.kind = {
    'is_unconditional': 'unconditional',
    'sos': 'unconditional',
    'class': 'class',
    'vqgan': 'spatial',
    'is_first_stage': 'spatial',
  }.get(kind, kind)
  if kind == 'class':
    c.cond.n_classes = int(cond_cfg.get('params', {}).get('n_classes', 0))
  elif kind == 'vqgan':
    c.cond.workdir = os.path.join(out_dir, 'cond_stage')
    c.cond.model.update(stage_model(cond_cfg))
  elif kind == 'is_first_stage':
    c.cond.workdir = c.stage1_workdir
    c.cond.model.update(fs_model.to_dict())
  if kind in ('vqgan', 'is_first_stage'):
    c.cond.key = model_params.get('cond_stage_key', 'depth')
  if base_lr is not None:
    c.optim.base_lr = float(base_lr)
  c.taming = dict(
    first_stage_key=model_params.get('first_stage_key', 'image'),
    cond_stage_key=model_params.get('cond_stage_key', 'depth'),
    cond_stage_target=cond_cfg if isinstance(cond_cfg, str) else cond_cfg.get('target'),
    downsample_cond_size=int(model_params.get('downsample_cond_size', -1)),
    permuter=(model_params.get('permuter_config') or {}).get(
      'target', 'taming.modules.transformer.permuter.Identity'
    ),
  )
  return c
