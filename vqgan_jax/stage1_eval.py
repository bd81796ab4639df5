"""The stage-1 eval, one for training's periodic eval and `--mode=eval`: the jitted step
(per-image metrics of `metrics.STAGE1` and the code histogram over the real images of a
padded batch) and the pass over an eval split, which adds the Frechet distance of each feature
net (`feature_nets`) between the inputs and their reconstructions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import fid
from vqgan_jax import images as images_lib
from vqgan_jax import metrics as metrics_lib
from vqgan_jax import parallel
from vqgan_jax.data import pipeline
from vqgan_jax.models.vqgan_load import Models
from vqgan_jax.models.vqgan_load import to_model_range


def eval_step(models: Models, params, lpips_params, images, mask):
  """Sums of per-image metrics over the real (mask=True) images, and the code histogram."""
  x = to_model_range(images)
  xrec, _, indices = models.vqgan.apply({'params': params}, x)
  xrec = jnp.clip(xrec.astype(jnp.float32), -1.0, 1.0)
  w = mask.astype(jnp.float32)
  lpips = lambda a, b: models.lpips.apply({'params': lpips_params}, a, b, deterministic=True)
  per_image = {m.name: m.per_image(x, xrec, lpips) for m in metrics_lib.PER_IMAGE}
  sums = {k: jnp.sum(v.reshape(-1) * w) for k, v in per_image.items()}
  sums['count'] = jnp.sum(w)
  code_mask = jnp.broadcast_to(mask[:, None, None], indices.shape)
  sums['code_counts'] = metrics_lib.codebook_counts(indices, models.vqgan.n_embed, code_mask)
  return sums, xrec


def make_eval_step(models: Models, mesh, param_shardings, lpips_shardings):
  batch = parallel.batch_sharding(mesh)
  return jax.jit(
    functools.partial(eval_step, models),
    in_shardings=(param_shardings, lpips_shardings, batch, batch),
    out_shardings=(parallel.replicated(mesh), batch),
  )


def stats(acc, ext) -> dict:
  """A `fid.StatsAccumulator`'s statistics, as `fid.fid_from_stats` reads them."""
  mu, sigma = acc.mu_sigma()
  return {'mu': mu, 'sigma': sigma, 'count': acc.count, 'extractor': ext.name}


def run(eval_fn, params, lpips_params, batches, mesh, exts, *, ref=None, num_grid=16, hooks=()):
  """One pass of `eval_fn` (`make_eval_step`) over `batches` (local {'image', 'mask'}):
  returns (the figures of `metrics.STAGE1`, keyed and ordered as listed, then each feature
  metric; the (inputs, uint8 reconstructions) of the first `num_grid` real images).

  `exts`: {metric: extractor} (`feature_nets.extractors`); `ref`: {metric: statistics of the
  real images} already known (a cached split), the others are gathered in this pass.
  `hooks`: (on_batch(), on_count(images measured)) or (): a progress bar's update after
  each batch; a check of the count before any statistics are computed from it."""
  on_batch, on_count = hooks or (lambda: None, lambda _: None)
  ref = ref or {}
  sharding = parallel.batch_sharding(mesh)
  real = {m: fid.StatsAccumulator(e.feature_dim) for m, e in exts.items() if m not in ref}
  fake = {m: fid.StatsAccumulator(e.feature_dim) for m, e in exts.items()}
  totals, grid = None, None
  for local in batches:
    g = pipeline.to_global({'image': local['image'], 'mask': local['mask']}, sharding)
    sums, xrec = eval_fn(params, lpips_params, g['image'], g['mask'])
    mask = parallel.gather(g['mask'])
    for m, e in exts.items():
      fake[m].add(e(xrec)['features'], mask)
      if m in real:
        real[m].add(e(to_model_range(g['image']))['features'], mask)
    sums = jax.device_get(sums)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    keep = mask.astype(bool)  # not padding, and decoded
    if grid is None and keep.any():
      grid = (
        parallel.gather(g['image'])[keep][:num_grid],
        images_lib.to_uint8(parallel.gather(xrec)[keep][:num_grid]),
      )
    on_batch()
  on_count(int(totals['count']))
  count = max(float(totals['count']), 1.0)
  result = {m.name: float(totals[m.name]) / count for m in metrics_lib.PER_IMAGE}
  result['codebook_usage'] = float(metrics_lib.usage_from_counts(totals['code_counts']))
  result['perplexity'] = float(metrics_lib.perplexity_from_counts(totals['code_counts']))
  result['num_images'] = int(totals['count'])
  for m, e in exts.items():
    reference = ref.get(m) or stats(real[m], e)
    name = metrics_lib.feature_metric(m, stage=1).name
    result[name] = fid.fid_from_stats(reference, stats(fake[m], e))
  return result, grid


def save_pairs(path, inputs, recons):
  """A PNG of the inputs interleaved row by row with their reconstructions; returns the
  grid (HWC uint8)."""
  ncol = min(int(np.ceil(np.sqrt(2 * len(inputs)) / 2) * 2) or 1, len(inputs))
  grid = images_lib.make_grid(images_lib.interleave_rows(inputs, recons, ncol), ncol)
  images_lib.save_png(path, grid, scale=max(1, 512 // grid.shape[1]))
  return grid
