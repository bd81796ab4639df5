"""Completion and inpainting: the codes of a partial image generated around the kept ones.

`keep` is a boolean mask over the (h, w) code grid, shared by the batch (`KEEP_MASKS` names the
usual ones). Kept codes are returned unchanged; the others are drawn by the generator:

- GPT: the kept codes must be a raster prefix (the first P codes in raster order, e.g. the
  top half, as the original's "samples_half"). The condition and the prefix fill the K/V cache
  in one forward (`sampling.sample`'s prefill, the prefix taken as more condition), then the
  other N - P codes are drawn one per step; the i-th drawn code (0-based, from the first
  unknown one) uses `fold_in(rng, i)`.
- MaskGIT: any mask. The kept codes start decoded, so the sampler never re-masks or changes
  them, and its schedule counts only the unknown codes (`maskgit_sampling.sample(known=...)`).

Guidance works as in sampling: the unconditional half sees the same kept codes.
"""

import jax.numpy as jnp
import numpy as np

from vqgan_jax import maskgit_sampling
from vqgan_jax import sampling


def top_half(grid):
  """Keeps the top h // 2 rows (a raster prefix: the GPT completes the bottom)."""
  keep = np.zeros(grid, bool)
  keep[: grid[0] // 2] = True
  return keep


def left_half(grid):
  """Keeps the left w // 2 columns."""
  keep = np.zeros(grid, bool)
  keep[:, : grid[1] // 2] = True
  return keep


def center_box(grid):
  """Keeps the central box of half the height and half the width (outpainting)."""
  h, w = grid
  keep = np.zeros(grid, bool)
  keep[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = True
  return keep


def outside_center_box(grid):
  """Keeps everything but the central box (inpainting)."""
  return ~center_box(grid)


KEEP_MASKS = {
  'top_half': top_half,
  'left_half': left_half,
  'center_box': center_box,
  'outside_center_box': outside_center_box,
}


def check_keep_name(name, field='keep'):
  """Raises one ValueError naming `field` unless `name` is a mask of KEEP_MASKS."""
  if name not in KEEP_MASKS:
    raise ValueError(f'{field} must be one of {sorted(KEEP_MASKS)}, got {name!r}')


def keep_mask(name, grid, field='keep'):
  """The named mask of KEEP_MASKS over an (h, w) code grid."""
  check_keep_name(name, field)
  return KEEP_MASKS[name](tuple(grid))


def check_keep(keep, grid):
  """`keep` as an (h, w) host bool array of the code grid's shape."""
  a = np.asarray(keep)
  if a.dtype != bool or a.shape != tuple(grid):
    raise ValueError(
      f"keep must be a boolean array of the code grid's shape {tuple(grid)} "
      f'(completion.KEEP_MASKS), got {a.dtype} of shape {a.shape}'
    )
  return a


def prefix_length(keep):
  """P where `keep` (h, w) keeps exactly the first P codes in raster order; otherwise the
  GPT's one refusal."""
  flat = np.asarray(keep, bool).reshape(-1)
  p = int(flat.sum())
  if not (flat[:p].all() and not flat[p:].any()):
    raise ValueError(
      'keep must be a raster prefix for a GPT (it generates codes in raster order after the '
      'kept ones, such as top_half); left_half, center_box, outside_center_box and other masks '
      'need a MaskGIT model'
    )
  return p


def complete_codes(
  params,
  model,
  kind,
  cond,
  codes,
  keep,
  rng,
  *,
  cfg_scale=None,
  uncond_tokens=None,
  **sampling_args,
):
  """(B, N) int32 codes (a jax array): `codes` (B, N) where `keep` (h, w) is set, the rest
  generated.

  kind: 'gpt' or 'maskgit' (`model` and its params); cond: (B, Lc) condition tokens;
  uncond_tokens with cfg_scale: guidance's unconditional condition. sampling_args: the
  sampler's own (temperature, top_k, top_p; MaskGIT's iterations, schedule, choice_temperature,
  confidence).
  """
  keep = np.asarray(keep, bool)
  n = np.shape(codes)[1]
  if keep.all():
    return jnp.asarray(codes, jnp.int32)
  guide = dict(cfg_scale=cfg_scale, uncond_tokens=uncond_tokens)
  if kind == 'maskgit':
    return maskgit_sampling.sample(
      params, model, cond, rng, known=(codes, keep), **guide, **sampling_args
    )
  p = prefix_length(keep)
  prefix = jnp.asarray(codes, jnp.int32)[:, :p]
  with_prefix = lambda c: jnp.concatenate([jnp.asarray(c, jnp.int32), prefix], axis=1)
  if uncond_tokens is not None:
    guide['uncond_tokens'] = with_prefix(uncond_tokens)
  rest = sampling.sample(
    params, model, with_prefix(cond), rng, steps=n - p, **guide, **sampling_args
  )
  return jnp.concatenate([prefix, rest], axis=1)
