"""The stage-1 eval step: per-image reconstruction metrics (PSNR, SSIM, LPIPS, L1) and the
code histogram over the real images of a padded batch. The trainer's periodic eval and
--mode=eval run the same step.
"""

import functools

import jax
import jax.numpy as jnp

from vqgan_jax import metrics as metrics_lib
from vqgan_jax import parallel
from vqgan_jax.models.vqgan_load import Models
from vqgan_jax.models.vqgan_load import to_model_range


def eval_step(models: Models, params, lpips_params, images, mask):
  """Sums of per-image metrics over the real (mask=True) images, and the code histogram."""
  x = to_model_range(images)
  xrec, _, indices = models.vqgan.apply({'params': params}, x)
  xrec = jnp.clip(xrec.astype(jnp.float32), -1.0, 1.0)
  w = mask.astype(jnp.float32)
  per_image = {
    'psnr': metrics_lib.psnr(x, xrec),
    'ssim': metrics_lib.ssim(x, xrec),
    'lpips': models.lpips.apply({'params': lpips_params}, x, xrec, deterministic=True),
    'l1': jnp.mean(jnp.abs(x - xrec), axis=(1, 2, 3)),
  }
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
