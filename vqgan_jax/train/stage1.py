"""Stage 1: VQGAN training state, the fused AE + discriminator step, and the eval step.

One jitted, donated step does both updates of taming's two-optimizer iteration:

* one autoencoder forward (saving its VJP), the reconstruction loss (L1 + LPIPS), and one
  discriminator forward on the reconstruction;
* the adaptive weight from the two last-layer gradients, obtained by contracting
  d(nll)/d(xrec) and d(g)/d(xrec) with the activations entering `decoder.conv_out`,
  instead of two extra backward passes through the whole decoder;
* one AE backward with the combined cotangent, and the discriminator gradients from the
  same fake forward (plus one real forward).

The one intended difference from the original: the discriminator is trained on the
reconstruction of the *same* AE forward, where PyTorch Lightning recomputed it with the
freshly updated autoencoder (one more AE forward per step, and a one-step-stale fake).
As a consequence D's BatchNorm running statistics move twice per step (fakes, then
reals) instead of three times (fakes, reals, fakes); they are only used in eval mode.
"""

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from vqgan_jax import checkpoints
from vqgan_jax import losses
from vqgan_jax import metrics as metrics_lib
from vqgan_jax import parallel
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.models import vqgan as vqgan_lib
from vqgan_jax.models.discriminator import NLayerDiscriminator
from vqgan_jax.train.common import peak_learning_rate
from vqgan_jax.train.common import setup_initial_state
from vqgan_jax.validate import DTYPES


class Models(NamedTuple):
  vqgan: vqgan_lib.VQGAN
  disc: NLayerDiscriminator
  lpips: Any


def remat_policy_name(config):
  """The VQGAN's `jax.checkpoint_policies` name from `config.train.remat` / `remat_policy`
  (None: no remat)."""
  t = config.train
  return t.get('remat_policy', 'nothing_saveable') if t.get('remat', 'none') == 'block' else None


def build_models(config) -> Models:
  dtype = DTYPES[config.train.dtype]
  vqgan = vqgan_lib.from_config(config.model, dtype=dtype, remat_policy=remat_policy_name(config))
  disc = NLayerDiscriminator(
    ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers, dtype=dtype
  )
  return Models(vqgan, disc, lpips_lib.LPIPS(dtype=dtype))


def make_optimizers(config):
  adam = lambda: optax.adam(
    peak_learning_rate(config), b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps
  )
  return adam(), adam()


def init_state(config, models: Models, rng):
  """The full training state as a plain dict pytree (what the checkpoints hold)."""
  size = config.data.image_size
  x = jnp.zeros((1, size, size, config.model.in_channels), jnp.float32)
  k_ae, k_d, k_run = jax.random.split(rng, 3)
  params = models.vqgan.init(k_ae, x)['params']
  d_vars = models.disc.init(k_d, x, train=True)
  tx, dtx = make_optimizers(config)
  return {
    'step': jnp.zeros((), jnp.int32),
    'params': params,
    'opt_state': tx.init(params),
    'disc_params': d_vars['params'],
    'disc_stats': d_vars['batch_stats'],
    'disc_opt_state': dtx.init(d_vars['params']),
    'rng': k_run,
  }


def state_setup(config, models: Models, mesh, rng):
  """(abstract state, shardings, born-sharded initialiser) of the stage-1 training state."""
  return setup_initial_state(
    functools.partial(init_state, config, models),
    rng,
    lambda abstract: parallel.state_shardings(abstract, mesh, parallel.axis_rules(config)),
  )


def create_sharded_state(config, models: Models, mesh, rng):
  """The initial state, born in its shardings (never whole on one device), and those."""
  _, shardings, init = state_setup(config, models, mesh, rng)
  return init(), shardings


def to_model_range(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


def _conv_kernel_vjp(h, kernel):
  """VJP of the decoder's last 3x3 conv w.r.t. its kernel, at activations h, in float32
  whatever the compute dtype (the adaptive weight is a ratio of these gradients' norms)."""
  h = h.astype(jnp.float32)
  conv = lambda w: jax.lax.conv_general_dilated(
    h, w.astype(h.dtype), (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  return jax.vjp(conv, kernel)[1]


def train_step(config, models: Models, disc_start: int, state, lpips_params, images):
  """One stage-1 iteration; returns (new_state, metrics)."""
  cfg = config.loss
  x = to_model_range(images)
  step = state['step']
  rng = jax.random.fold_in(state['rng'], step)
  k_lpips, k_drop = jax.random.split(rng)
  ae_deterministic = config.model.dropout == 0.0

  def ae_forward(params):
    variables = {'params': params}
    # 'gumbel': the Gumbel quantizer's training noise (the VQ quantizer takes none).
    rngs = {'dropout': k_drop, 'gumbel': jax.random.fold_in(k_drop, 1)}
    z_q, qloss, indices = models.vqgan.apply(
      variables, x, ae_deterministic, train=True, rngs=rngs, method='encode'
    )
    h, xrec = models.vqgan.apply(
      variables, z_q, ae_deterministic, rngs=rngs, method='decode_with_features'
    )
    return (xrec, qloss), (h, indices)

  (xrec, qloss), ae_vjp, (h, indices) = jax.vjp(ae_forward, state['params'], has_aux=True)

  def nll_fn(xr):
    rec = losses.l1(x, xr)
    p = jnp.mean(
      models.lpips.apply(
        {'params': lpips_params},
        x,
        xr,
        deterministic=not cfg.lpips_dropout,
        rngs={'dropout': k_lpips},
      )
    )
    return rec + cfg.perceptual_weight * p, (rec, p)

  (nll, (rec_loss, p_loss)), ct_nll = jax.value_and_grad(nll_fn, has_aux=True)(xrec)

  def disc_forward(d_params, stats, inp):
    logits, updates = models.disc.apply(
      {'params': d_params, 'batch_stats': stats}, inp, train=True, mutable=['batch_stats']
    )
    return logits, updates['batch_stats']

  # D sees fakes and reals in separate calls (separate BatchNorm statistics), as the original.
  logits_fake, fake_vjp, stats_after_fake = jax.vjp(
    lambda dp, xr: disc_forward(dp, state['disc_stats'], xr),
    state['disc_params'],
    xrec,
    has_aux=True,
  )
  g_loss, ct_logits_g = jax.value_and_grad(losses.generator_loss)(logits_fake)
  _, ct_g = fake_vjp(ct_logits_g)

  kernel_vjp = _conv_kernel_vjp(h, state['params']['decoder']['conv_out']['kernel'])
  d_weight = losses.adaptive_weight(kernel_vjp(ct_nll)[0], kernel_vjp(ct_g)[0], cfg.disc_weight)
  dfactor = losses.disc_factor(step, disc_start, cfg.disc_factor)
  gan_scale = d_weight * dfactor
  total_loss = nll + gan_scale * g_loss + cfg.codebook_weight * qloss
  ct_xrec = ct_nll.astype(jnp.float32) + gan_scale * ct_g.astype(jnp.float32)
  (ae_grads,) = ae_vjp((ct_xrec.astype(xrec.dtype), jnp.asarray(cfg.codebook_weight, qloss.dtype)))

  logits_real, real_vjp, stats = jax.vjp(
    lambda dp: disc_forward(dp, stats_after_fake, x), state['disc_params'], has_aux=True
  )
  d_loss_fn = lambda lr, lf: dfactor * losses.D_LOSSES[cfg.disc_loss](lr, lf)
  disc_loss, (ct_real, ct_fake) = jax.value_and_grad(d_loss_fn, argnums=(0, 1))(
    logits_real, logits_fake
  )
  d_grads = jax.tree.map(jnp.add, real_vjp(ct_real)[0], fake_vjp(ct_fake)[0])

  tx, dtx = make_optimizers(config)
  updates, opt_state = tx.update(ae_grads, state['opt_state'], state['params'])
  d_updates, d_opt_state = dtx.update(d_grads, state['disc_opt_state'], state['disc_params'])
  codes = metrics_lib.codebook_stats(indices, config.model.n_embed)
  new_state = dict(
    state,
    step=step + 1,
    params=optax.apply_updates(state['params'], updates),
    opt_state=opt_state,
    disc_params=optax.apply_updates(state['disc_params'], d_updates),
    disc_stats=stats,
    disc_opt_state=d_opt_state,
  )
  metrics = {
    'total_loss': total_loss,
    'quant_loss': qloss,
    'nll_loss': nll,
    'rec_loss': rec_loss,
    'p_loss': p_loss,
    'g_loss': g_loss,
    'd_weight': d_weight,
    'disc_factor': dfactor,
    'disc_loss': disc_loss,
    'logits_real': jnp.mean(logits_real),
    'logits_fake': jnp.mean(logits_fake),
    'ae_grad_norm': optax.global_norm(ae_grads),
    'disc_grad_norm': optax.global_norm(d_grads),
    'codebook_usage': codes['usage'],
    'perplexity': codes['perplexity'],
  }
  return new_state, metrics


def make_train_step(config, models: Models, mesh, state_shardings, lpips_shardings):
  disc_start = losses.resolve_disc_start(config.loss.disc_start, config.train.num_steps)
  fn = functools.partial(train_step, config, models, disc_start)
  return jax.jit(
    fn,
    in_shardings=(state_shardings, lpips_shardings, parallel.batch_sharding(mesh)),
    out_shardings=(state_shardings, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )


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


def vqgan_param_shardings(vqgan, mesh, rules=()):
  """(abstract params, shardings) of a VQGAN's parameters on `mesh` under `rules`."""
  x = jnp.zeros((1, vqgan.resolution, vqgan.resolution, vqgan.in_channels), jnp.float32)
  abstract = jax.eval_shape(lambda r: vqgan.init(r, x)['params'], jax.random.PRNGKey(0))
  return abstract, parallel.state_shardings(abstract, mesh, rules)


def init_vqgan_params(vqgan, mesh, rng, rules=()):
  """Randomly initialised VQGAN params, born sharded (tests and smoke runs only)."""
  x = jnp.zeros((1, vqgan.resolution, vqgan.resolution, vqgan.in_channels), jnp.float32)
  _, shardings = vqgan_param_shardings(vqgan, mesh, rules)
  return jax.jit(lambda r: vqgan.init(r, x)['params'], out_shardings=shardings)(rng)


def restore_vqgan_params(workdir, vqgan, mesh, rules=(), step=None):
  """A stage-1 run's VQGAN params (latest step by default), read straight into their
  shardings on `mesh` (any mesh and process count)."""
  abstract, shardings = vqgan_param_shardings(vqgan, mesh, rules)
  return checkpoints.restore_params(
    workdir, checkpoints.abstract_like(abstract, shardings), step=step
  )
