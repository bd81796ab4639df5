"""The table between the original's state-dict keys and our parameter paths, both ways.

numpy only: a state dict of arrays in, nested dicts of float32 numpy arrays out, every key
accounted for (torch tensors are accepted and turned into numpy; torch is never imported).

VQModel, discriminator and LPIPS (spec g.4), applied to every key after the module prefix
(`encoder.`, `loss.discriminator.`, ...): a path component that is an integer joins its
parent (`down.0.block.1.conv1` -> `down_0/block_1/conv1`; `mid.block_1` stays
`mid/block_1`), and

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
`jax.eval_shape` of our model's init for the same fields, so structure and every shape are
checked. Keys that carry no parameter of ours are dropped only if they are in IGNORED.

The GPT's table is in `models/transformer.py`'s docstring (Linear weights transposed,
`blocks.{l}` -> `blocks_{l}`, `mlp.0` -> `mlp_0`).
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.convert import ConversionError
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.models import transformer as gpt_lib
from vqgan_jax.models import vqgan as vqgan_lib
from vqgan_jax.models.discriminator import NLayerDiscriminator

# (pattern, why): keys that hold nothing we load. Anything else left over is an error.
IGNORED = (
  (r'(^|\.)num_batches_tracked$', 'BatchNorm step counter'),
  (r'^loss\.perceptual_loss\.scaling_layer\.(shift|scale)$', 'LPIPS constants (in code)'),
  (r'^colorize$', 'segmentation visualisation buffer'),
  (r'(^|\.)attn\.mask$', 'GPT causal mask (recomputed)'),
  (r'^permuter\.(forward|backward)_shuffle_idx$', 'permuter indices (config records it)'),
)


def ignored(key: str) -> bool:
  return any(re.search(p, key) for p, _ in IGNORED)


def listing(keys, n=12) -> str:
  """The first `n` of `keys`, sorted, for messages."""
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


def count_params(tree) -> int:
  return int(sum(np.size(v) for v in flat(tree).values())) if tree else 0


# --------------------------------------------------------------------------------------------
# What a state dict is
# --------------------------------------------------------------------------------------------


def gumbel_keys(sd, prefix=''):
  """The keys only a GumbelQuantize has (a VectorQuantizer2 has `quantize.embedding`)."""
  return [
    k
    for k in sd
    if k.startswith(prefix + 'quantize.proj.') or k == prefix + 'quantize.embed.weight'
  ]


def state_dict_kind(sd: Mapping[str, Any]) -> str | None:
  """'Net2NetTransformer', 'GumbelVQ' or 'VQModel' (VQSegmentationModel included), read off
  the keys; None when the keys are none of these."""
  if any(k.startswith('transformer.') for k in sd) and any(
    k.startswith('first_stage_model.') for k in sd
  ):
    return 'Net2NetTransformer'
  if gumbel_keys(sd):
    return 'GumbelVQ'
  if 'quantize.embedding.weight' in sd or any(k.startswith('encoder.') for k in sd):
    return 'VQModel'
  return None


# --------------------------------------------------------------------------------------------
# Generic table-driven mapping of one module
# --------------------------------------------------------------------------------------------


def flat(tree, prefix=()):
  """Nested dicts -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _nest(flat_tree):
  tree = {}
  for path, v in sorted(flat_tree.items()):
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


def torch_name(path: tuple[str, ...], collection: str) -> str:
  """Inverse of the table: flax path -> the torch key it comes from."""
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


def map_module(
  sd: Mapping[str, np.ndarray],
  prefix: str,
  target: Mapping[str, Any],
  problems: list[str],
  where: str = '',
) -> tuple[dict, set[str]]:
  """Fills `target` ({'params': ..., ['batch_stats': ...]} of abstract leaves) from the keys
  of `sd` under `prefix`. Appends one line per problem (flax paths shown under `where`);
  returns (trees, consumed keys)."""
  flat_target = {(c,) + p: leaf for c, tree in target.items() for p, leaf in flat(tree).items()}
  filled: dict[tuple, np.ndarray] = {}
  used, mismatched = set(), set()
  for key in sorted(k for k in sd if k.startswith(prefix)):
    if ignored(key):
      used.add(key)
      continue
    *mod, leaf = module_path(key[len(prefix) :])
    if leaf in ('running_mean', 'running_var'):
      candidates = [('batch_stats', *mod, leaf[len('running_') :])]
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
      problems.append(
        f'{key}: shape {tuple(w.shape)} does not fit '
        f'{dest[0]}/{where}{"/".join(dest[1:])} {tuple(flat_target[dest].shape)}'
      )
      mismatched.add(dest)
      continue
    filled[dest] = out
  for p in flat_target:
    if p not in filled and p not in mismatched:
      problems.append(
        f'missing key {prefix}{torch_name(p[1:], p[0])} (for '
        f'{p[0]}/{where}{"/".join(p[1:])} {tuple(flat_target[p].shape)})'
      )
  trees = _nest(filled)
  return {c: trees.get(c, {}) for c in target}, used


def to_torch_layout(trees: Mapping[str, Any], prefix: str = '') -> dict[str, np.ndarray]:
  """The inverse table: {'params': ..., ['batch_stats': ...]} -> torch-named numpy arrays.

  For exports and for round-trip tests that need no torch. 2-D kernels are the attention
  1x1 convs (the only Dense layers of the VQGAN, discriminator and LPIPS).
  """
  out = {}
  for collection, tree in trees.items():
    for path, w in flat(tree).items():
      w = np.asarray(w, np.float32)
      if path[-1] == 'kernel' and w.ndim == 4:
        w = w.transpose(3, 2, 0, 1)
      elif path[-1] == 'kernel' and w.ndim == 2:
        w = w.T[:, :, None, None]
      out[prefix + torch_name(path, collection)] = np.ascontiguousarray(w)
  return out


# --------------------------------------------------------------------------------------------
# VQModel / GumbelVQ (+ discriminator and LPIPS of its loss)
# --------------------------------------------------------------------------------------------


def abstract_vqgan(fields: Mapping[str, Any]):
  """Our VQGAN's variables (shapes only) for stage-1 `model` fields."""
  x = jax.ShapeDtypeStruct(
    (1, fields['resolution'], fields['resolution'], fields['in_channels']), jnp.float32
  )
  return jax.eval_shape(vqgan_lib.from_config(fields).init, jax.random.PRNGKey(0), x)


def abstract_disc(n_layers: int, ndf: int, in_channels: int, size: int):
  disc = NLayerDiscriminator(ndf=ndf, n_layers=n_layers)
  x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
  return jax.eval_shape(lambda k, x: disc.init(k, x, train=True), jax.random.PRNGKey(0), x)


def _abstract_lpips():
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lpips_lib.LPIPS().init, jax.random.PRNGKey(0), x, x)


def discriminator_layout(sd: Mapping[str, np.ndarray], prefix='loss.discriminator.') -> dict:
  """(n_layers, ndf, in_channels) of a BatchNorm NLayerDiscriminator, read off its keys."""
  keys = [k for k in sd if k.startswith(prefix)]
  if not keys:
    return {}
  actnorm = [
    k
    for k in keys
    if re.search(r'\.(loc|initialized)$', k) or (k.endswith('.scale') and sd[k].ndim == 4)
  ]
  if actnorm:
    raise ConversionError(
      f'discriminator with ActNorm (use_actnorm=True) is not supported; keys: {listing(actnorm)}'
    )
  first = sd.get(prefix + 'main.0.weight')
  if first is None or first.ndim != 4:
    raise ConversionError(f'missing {prefix}main.0.weight (4-D conv weight)')
  n_layers = sum(1 for k in keys if k.endswith('.running_mean'))
  return {'n_layers': n_layers, 'ndf': int(first.shape[0]), 'in_channels': int(first.shape[1])}


def _check_quantizer(sd, prefix, quantizer):
  """A clear error when the state dict's quantizer is not the one asked for."""
  gumbel = gumbel_keys(sd, prefix)
  if quantizer == 'vq' and gumbel:
    raise ConversionError(
      f'this is a GumbelVQ state dict (GumbelQuantize: {listing(gumbel)}); convert it with '
      "quantizer='gumbel' (the yaml target taming.models.vqgan.GumbelVQ does that)"
    )
  if quantizer == 'gumbel' and not gumbel and prefix + 'quantize.embedding.weight' in sd:
    raise ConversionError(
      f"quantizer='gumbel' but {prefix}quantize.embedding.weight is a VectorQuantizer2 "
      'codebook (a VQModel, not a GumbelVQ)'
    )


def vqmodel_from_torch_state_dict(
  sd: Mapping[str, Any], fields: Mapping[str, Any], *, with_loss: bool = True, prefix: str = ''
) -> dict:
  """A taming VQModel (or GumbelVQ) state dict -> {'params', ['disc_params', 'disc_stats',
  'lpips_params']} for our VQGAN of stage-1 `model` fields.

  `with_loss`: convert the `loss.*` keys (discriminator and LPIPS) when present; False drops
  them (a DummyLoss model has none: then only 'params'). `prefix`: the VQModel's key prefix
  inside `sd` (e.g. 'first_stage_model.'); other keys are not looked at.

  Raises:
    ConversionError: one error naming every left-over key, missing key and shape mismatch.
  """
  sd = to_numpy_state_dict({k: v for k, v in sd.items() if k.startswith(prefix)})
  _check_quantizer(sd, prefix, fields['quantizer'])
  problems: list[str] = []
  used: set[str] = set()
  out = {}
  params = {}
  # encoder, decoder, quantize, quant_conv, post_quant_conv: each its own key prefix.
  for name, sub in abstract_vqgan(fields)['params'].items():
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
      target = abstract_disc(
        layout['n_layers'], layout['ndf'], layout['in_channels'], 256
      )  # any size the layers fit: shapes do not depend on it
      trees, u = map_module(sd, prefix + 'loss.discriminator.', target, problems, 'disc/')
      out['disc_params'], out['disc_stats'] = trees['params'], trees['batch_stats']
      used |= u
    if any(k.startswith(prefix + 'loss.perceptual_loss.') for k in loss_keys):
      trees, u = map_module(
        sd,
        prefix + 'loss.perceptual_loss.',
        {'params': _abstract_lpips()['params']},
        problems,
        'lpips/',
      )
      out['lpips_params'] = trees['params']
      used |= u
  used |= {k for k in sd if ignored(k[len(prefix) :])}
  leftover = set(sd) - used
  if leftover:
    problems.insert(0, f'unexpected keys (not in our model, not ignored): {listing(leftover)}')
  if problems:
    raise ConversionError(
      f'state dict does not match VQGAN({", ".join(f"{k}={v}" for k, v in fields.items())}): '
      + '; '.join(problems[:30])
      + (f' (+{len(problems) - 30} more)' if len(problems) > 30 else '')
    )
  return out


def vqmodel_to_torch_state_dict(converted: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Output of `vqmodel_from_torch_state_dict` -> the taming VQModel state dict (numpy)."""
  sd = to_torch_layout({'params': converted['params']})
  if 'disc_params' in converted:
    sd.update(
      to_torch_layout(
        {'params': converted['disc_params'], 'batch_stats': converted['disc_stats']},
        'loss.discriminator.',
      )
    )
  if 'lpips_params' in converted:
    sd.update(to_torch_layout({'params': converted['lpips_params']}, 'loss.perceptual_loss.'))
  return sd


# --------------------------------------------------------------------------------------------
# GPT (taming's minGPT)
# --------------------------------------------------------------------------------------------


def gpt_from_torch_state_dict(sd: Mapping[str, Any], n_layer: int) -> dict:
  """Original GPT (or Net2NetTransformer) state dict -> canonical (per-layer) flax params,
  float32 numpy.

  Keys may carry the `transformer.` prefix of a Net2NetTransformer checkpoint (other
  submodules' keys are then ignored). Every GPT key must be consumed; `attn.mask` buffers are
  dropped.
  """
  if any(k.startswith('transformer.') for k in sd):
    sd = {k[len('transformer.') :]: v for k, v in sd.items() if k.startswith('transformer.')}
  sd = {k: v for k, v in to_numpy_state_dict(sd).items() if not k.endswith('attn.mask')}
  used = set()

  def get(key):
    if key not in sd:
      raise ConversionError(f'missing key {key!r} in the GPT state dict')
    used.add(key)
    return sd[key]

  def ln(prefix):
    return {'scale': get(f'{prefix}.weight'), 'bias': get(f'{prefix}.bias')}

  def linear(prefix, bias=True):
    p = {'kernel': get(f'{prefix}.weight').T.copy()}
    if bias:
      p['bias'] = get(f'{prefix}.bias')
    return p

  params = {'tok_emb': {'embedding': get('tok_emb.weight')}, 'pos_emb': get('pos_emb')}
  for l in range(n_layer):
    b = f'blocks.{l}'
    params[f'blocks_{l}'] = {
      'ln1': ln(f'{b}.ln1'),
      'ln2': ln(f'{b}.ln2'),
      'attn': {n: linear(f'{b}.attn.{n}') for n in ('key', 'query', 'value', 'proj')},
      'mlp_0': linear(f'{b}.mlp.0'),
      'mlp_2': linear(f'{b}.mlp.2'),
    }
  params['ln_f'] = ln('ln_f')
  params['head'] = linear('head', bias=False)
  unused = set(sd) - used
  if unused:
    raise ConversionError(f'GPT state dict keys not mapped (wrong n_layer?): {listing(unused, 8)}')
  return params


def gpt_to_torch_state_dict(params) -> dict:
  """Our GPT params (either layout, with or without the {'params': ...} wrapper) -> the
  original GPT's state-dict keys (numpy, no `attn.mask`)."""
  p = nn.unbox(params)
  if isinstance(p, Mapping) and set(p) == {'params'}:
    p = p['params']
  if 'blocks' in p:
    p = gpt_lib.unstack_layers(p)
  sd = {'tok_emb.weight': p['tok_emb']['embedding'], 'pos_emb': p['pos_emb']}
  n = sum(1 for k in p if k.startswith('blocks_'))

  def ln(prefix, tree):
    sd[f'{prefix}.weight'], sd[f'{prefix}.bias'] = tree['scale'], tree['bias']

  def linear(prefix, tree):
    sd[f'{prefix}.weight'] = np.asarray(tree['kernel']).T
    if 'bias' in tree:
      sd[f'{prefix}.bias'] = tree['bias']

  for l in range(n):
    blk = p[f'blocks_{l}']
    ln(f'blocks.{l}.ln1', blk['ln1'])
    ln(f'blocks.{l}.ln2', blk['ln2'])
    for name in ('key', 'query', 'value', 'proj'):
      linear(f'blocks.{l}.attn.{name}', blk['attn'][name])
    linear(f'blocks.{l}.mlp.0', blk['mlp_0'])
    linear(f'blocks.{l}.mlp.2', blk['mlp_2'])
  ln('ln_f', p['ln_f'])
  linear('head', p['head'])
  return {k: np.asarray(v) for k, v in sd.items()}
