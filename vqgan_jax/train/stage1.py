"""Stage 1: VQGAN training state and the fused AE + discriminator step (the models and their
loading: `models.vqgan_load`; the eval step: `stage1_eval`; the names imported from them
with `noqa: F401` stay importable here for callers of `stage1.*`).

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

Beyond the original, each off by default (`optional_state_keys` lists the state entries they
add; a run without them holds the original's state): the VQ codebook's EMA statistics and
dead-code restart, the codebook-usage window, LFQ's annealed entropy weight, a fixed GAN
weight instead of the adaptive one, LeCAM and R1 regularisation of D, and an EMA of the
generator's params.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from vqgan_jax import losses
from vqgan_jax import metrics as metrics_lib
from vqgan_jax import parallel
from vqgan_jax.models import quantizer as quantizer_lib
from vqgan_jax.models.vqgan_load import Models
from vqgan_jax.models.vqgan_load import build_models  # noqa: F401
from vqgan_jax.models.vqgan_load import init_vqgan_params  # noqa: F401
from vqgan_jax.models.vqgan_load import latest_step  # noqa: F401
from vqgan_jax.models.vqgan_load import remat_policy_name  # noqa: F401
from vqgan_jax.models.vqgan_load import restore_vqgan_params  # noqa: F401
from vqgan_jax.models.vqgan_load import to_model_range
from vqgan_jax.models.vqgan_load import tokenizer_identity  # noqa: F401
from vqgan_jax.models.vqgan_load import vqgan_param_shardings  # noqa: F401
from vqgan_jax.stage1_eval import eval_step  # noqa: F401
from vqgan_jax.stage1_eval import make_eval_step  # noqa: F401
from vqgan_jax.train.common import peak_learning_rate
from vqgan_jax.train.common import setup_initial_state


def make_optimizers(config):
  adam = lambda: optax.adam(
    peak_learning_rate(config), b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps
  )
  return adam(), adam()


EMA_EPS = quantizer_lib.EMA_EPS  # importable here as before


OPTIONAL_KEYS = ('quantizer', 'code_last_used', 'lecam', 'params_ema')


def optional_state_keys(config) -> tuple:
  """The train-state entries beyond the original's that a run with `config` holds (a
  ConfigDict; a saved one as `run_config.upgrade_config` reads it):

  'quantizer': the quantizer's train-time statistics, the flax collection, where its
    `QuantizerSpec.train_state` says so (the VQ's EMA codebook: model.ema_decay > 0);
  'code_last_used': (n_embed,) int32, the step each code was last picked at (0: never), for
    the usage window (train.usage_window) and dead-code restart (model.restart_window);
  'lecam': EMAs of D's mean logits on reals and fakes (loss.lecam_weight > 0);
  'params_ema': an EMA of the generator's params (train.params_ema_decay > 0).
  """
  m, loss, t = config.model, config.loss, config.train
  keys = []
  if quantizer_lib.QUANTIZERS[m.quantizer].train_state(m):
    keys.append('quantizer')
  if t.usage_window > 0 or m.restart_window > 0:
    keys.append('code_last_used')
  if loss.lecam_weight > 0:
    keys.append('lecam')
  if t.params_ema_decay > 0:
    keys.append('params_ema')
  return tuple(keys)


def fresh_optional_state(config, keys, params):
  """Initial values of the optional state entries `keys`, given the generator's params: the
  quantizer's statistics as its module's init makes them (`QuantizerSpec.init_state`: the
  VQ's count 1 at each code of the codebook), no code used yet, LeCAM's EMAs at 0, the
  params EMA at the params."""
  out = {}
  if 'quantizer' in keys:
    init = quantizer_lib.QUANTIZERS[config.model.quantizer].init_state
    out['quantizer'] = {'quantize': init(params['quantize'])}
  if 'code_last_used' in keys:
    out['code_last_used'] = jnp.zeros((config.model.n_embed,), jnp.int32)
  if 'lecam' in keys:
    out['lecam'] = {'real': jnp.zeros((), jnp.float32), 'fake': jnp.zeros((), jnp.float32)}
  if 'params_ema' in keys:
    out['params_ema'] = jax.tree.map(jnp.array, params)
  return out


def init_state(config, models: Models, rng, optional=None):
  """The full training state as a plain dict pytree (what the checkpoints hold).

  `optional`: the optional entries to hold (default: `optional_state_keys(config)`).
  """
  size = config.data.image_size
  x = jnp.zeros((1, size, size, config.model.in_channels), jnp.float32)
  k_ae, k_d, k_run = jax.random.split(rng, 3)
  variables = models.vqgan.init(k_ae, x)
  params = variables['params']
  d_vars = models.disc.init(k_d, x, train=True)
  tx, dtx = make_optimizers(config)
  state = {
    'step': jnp.zeros((), jnp.int32),
    'params': params,
    'opt_state': tx.init(params),
    'disc_params': d_vars['params'],
    'disc_stats': d_vars['batch_stats'],
    'disc_opt_state': dtx.init(d_vars['params']),
    'rng': k_run,
  }
  keys = optional_state_keys(config) if optional is None else tuple(optional)
  state.update(fresh_optional_state(config, [k for k in keys if k != 'quantizer'], params))
  if 'quantizer' in keys and 'quantizer' in variables:
    state['quantizer'] = variables['quantizer']  # the VQ module's own collection
  return state


def state_setup(config, models: Models, mesh, rng, optional=None):
  """(abstract state, shardings, born-sharded initialiser) of the stage-1 training state
  (`optional`: as `init_state`'s)."""
  return setup_initial_state(
    functools.partial(init_state, config, models, optional=optional),
    rng,
    lambda abstract: parallel.state_shardings(abstract, mesh, parallel.axis_rules(config)),
  )


def create_sharded_state(config, models: Models, mesh, rng):
  """The initial state, born in its shardings (never whole on one device), and those."""
  _, shardings, init = state_setup(config, models, mesh, rng)
  return init(), shardings


def _conv_kernel_vjp(h, kernel):
  """VJP of the decoder's last 3x3 conv w.r.t. its kernel, at activations h, in float32
  whatever the compute dtype (the adaptive weight is a ratio of these gradients' norms)."""
  h = h.astype(jnp.float32)
  conv = lambda w: jax.lax.conv_general_dilated(
    h, w.astype(h.dtype), (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  return jax.vjp(conv, kernel)[1]


def _autoencoder_loss(config, models: Models, state, lpips_params, x, step, rng):
  """The autoencoder's forward (with its VJP) and its reconstruction loss (L1 + LPIPS).
  Returns (forward: {'xrec', 'qloss', 'vjp', 'h', 'indices', 'latents'}, nll, d(nll)/d(xrec),
  metrics, the quantizer's train-term metrics)."""
  cfg = config.loss
  k_lpips, k_drop = jax.random.split(rng)
  ae_deterministic = config.model.dropout == 0.0
  # The VQ codebook updates read the quantizer's latents; the original's step asks for none.
  with_latents = 'quantizer' in state or config.model.restart_window > 0
  encode_kw = {'with_latents': True} if with_latents else {}
  # The quantizer's train-time keywords (LFQ's annealed entropy term) and their metrics.
  train_terms = models.vqgan.spec.train_terms
  terms, term_metrics = train_terms(cfg, step) if train_terms else ({}, {})
  encode_kw.update(terms)

  def ae_forward(params):
    variables = {'params': params}
    # 'gumbel': the Gumbel quantizer's training noise (the others take none).
    rngs = {'dropout': k_drop, 'gumbel': jax.random.fold_in(k_drop, 1)}
    z_q, qloss, indices, *latents = models.vqgan.apply(
      variables, x, ae_deterministic, train=True, rngs=rngs, method='encode', **encode_kw
    )
    h, xrec = models.vqgan.apply(
      variables, z_q, ae_deterministic, rngs=rngs, method='decode_with_features'
    )
    return (xrec, qloss), (h, indices, latents[0] if latents else None)

  (xrec, qloss), ae_vjp, (h, indices, latents) = jax.vjp(ae_forward, state['params'], has_aux=True)

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
  ae = dict(xrec=xrec, qloss=qloss, vjp=ae_vjp, h=h, indices=indices, latents=latents)
  return ae, nll, ct_nll, {'rec_loss': rec_loss, 'p_loss': p_loss}, term_metrics


def _disc_forward(models: Models, d_params, stats, inp):
  logits, updates = models.disc.apply(
    {'params': d_params, 'batch_stats': stats}, inp, train=True, mutable=['batch_stats']
  )
  return logits, updates['batch_stats']


def _adaptive_weight(cfg, state, h, ct_nll, ct_g):
  """The GAN weight: taming's ratio of the last layer's NLL and generator gradient norms, or
  the fixed `loss.disc_weight` (no last-layer gradients then)."""
  if not cfg.adaptive_weight:
    return jnp.asarray(cfg.disc_weight, jnp.float32)
  kernel_vjp = _conv_kernel_vjp(h, state['params']['decoder']['conv_out']['kernel'])
  return losses.adaptive_weight(kernel_vjp(ct_nll)[0], kernel_vjp(ct_g)[0], cfg.disc_weight)


def _disc_loss(cfg, models: Models, state, x, dfactor, logits_fake, fake_vjp, stats_after_fake):
  """The discriminator's loss and gradients: one real forward (after the fakes', separate
  BatchNorm statistics, as the original), LeCAM and R1 when on. Returns (loss, grads, its
  BatchNorm statistics, mean real logits, state entries, metrics)."""
  logits_real, real_vjp, stats = jax.vjp(
    lambda dp: _disc_forward(models, dp, stats_after_fake, x), state['disc_params'], has_aux=True
  )
  extra, metrics = {}, {}
  if 'lecam' in state:
    ema = jax.lax.stop_gradient(state['lecam'])
    d_loss_fn = lambda lr, lf: (
      dfactor
      * (
        losses.D_LOSSES[cfg.disc_loss](lr, lf)
        + cfg.lecam_weight * losses.lecam_reg(lr, lf, ema['real'], ema['fake'])
      )
    )
    metrics['lecam_reg'] = losses.lecam_reg(logits_real, logits_fake, ema['real'], ema['fake'])
    extra['lecam'] = losses.lecam_ema_update(ema, logits_real, logits_fake, cfg.lecam_decay)
  else:
    d_loss_fn = lambda lr, lf: dfactor * losses.D_LOSSES[cfg.disc_loss](lr, lf)
  disc_loss, (ct_real, ct_fake) = jax.value_and_grad(d_loss_fn, argnums=(0, 1))(
    logits_real, logits_fake
  )
  d_grads = jax.tree.map(jnp.add, real_vjp(ct_real)[0], fake_vjp(ct_fake)[0])
  if cfg.r1_weight > 0:
    r1, r1_grads = jax.value_and_grad(
      lambda dp: losses.r1_penalty(
        lambda inp: _disc_forward(models, dp, stats_after_fake, inp)[0], x
      )
    )(state['disc_params'])
    scale = dfactor * 0.5 * cfg.r1_weight
    d_grads = jax.tree.map(lambda g, r: g + scale * r, d_grads, r1_grads)
    disc_loss = disc_loss + scale * r1
    metrics['r1_penalty'] = r1
  metrics['logits_real'] = jnp.mean(logits_real)
  return disc_loss, d_grads, stats, extra, metrics


def _updates(config, state, ae_grads, d_grads, indices, latents, step, rng):
  """Both optimizers' updates, then the code-level ones and the params EMA: (the new params,
  opt_state, disc params, disc opt_state, state entries, metrics)."""
  tx, dtx = make_optimizers(config)
  updates, opt_state = tx.update(ae_grads, state['opt_state'], state['params'])
  d_updates, d_opt_state = dtx.update(d_grads, state['disc_opt_state'], state['disc_params'])
  params = optax.apply_updates(state['params'], updates)
  params, extra, metrics = _codebook_updates(
    config, state, params, indices, latents, step + 1, jax.random.fold_in(rng, 2)
  )
  if 'params_ema' in state:
    decay = config.train.params_ema_decay
    extra['params_ema'] = jax.tree.map(
      lambda e, p: decay * e + (1.0 - decay) * p, state['params_ema'], params
    )
  disc_params = optax.apply_updates(state['disc_params'], d_updates)
  return params, opt_state, disc_params, d_opt_state, extra, metrics


def train_step(config, models: Models, disc_start: int, state, lpips_params, images):
  """One stage-1 iteration; returns (new_state, metrics)."""
  cfg = config.loss
  x = to_model_range(images)
  step = state['step']
  rng = jax.random.fold_in(state['rng'], step)
  ae, nll, ct_nll, nll_metrics, term_metrics = _autoencoder_loss(
    config, models, state, lpips_params, x, step, rng
  )
  xrec, qloss = ae['xrec'], ae['qloss']
  # D sees fakes and reals in separate calls (separate BatchNorm statistics), as the original.
  logits_fake, fake_vjp, stats_after_fake = jax.vjp(
    lambda dp, xr: _disc_forward(models, dp, state['disc_stats'], xr),
    state['disc_params'],
    xrec,
    has_aux=True,
  )
  g_loss, ct_logits_g = jax.value_and_grad(losses.generator_loss)(logits_fake)
  _, ct_g = fake_vjp(ct_logits_g)
  d_weight = _adaptive_weight(cfg, state, ae['h'], ct_nll, ct_g)
  dfactor = losses.disc_factor(step, disc_start, cfg.disc_factor)
  gan_scale = d_weight * dfactor
  total_loss = nll + gan_scale * g_loss + cfg.codebook_weight * qloss
  ct_xrec = ct_nll.astype(jnp.float32) + gan_scale * ct_g.astype(jnp.float32)
  (ae_grads,) = ae['vjp'](
    (ct_xrec.astype(xrec.dtype), jnp.asarray(cfg.codebook_weight, qloss.dtype))
  )
  disc_loss, d_grads, stats, extra, d_metrics = _disc_loss(
    cfg, models, state, x, dfactor, logits_fake, fake_vjp, stats_after_fake
  )
  params, opt_state, disc_params, d_opt_state, more, metrics = _updates(
    config, state, ae_grads, d_grads, ae['indices'], ae['latents'], step, rng
  )
  codes = metrics_lib.codebook_stats(ae['indices'], config.model.n_embed)
  new_state = dict(
    state,
    step=step + 1,
    params=params,
    opt_state=opt_state,
    disc_params=disc_params,
    disc_stats=stats,
    disc_opt_state=d_opt_state,
    **extra,
    **more,
  )
  metrics = {
    'total_loss': total_loss,
    'quant_loss': qloss,
    'nll_loss': nll,
    **nll_metrics,
    'g_loss': g_loss,
    'd_weight': d_weight,
    'disc_factor': dfactor,
    'disc_loss': disc_loss,
    'logits_real': d_metrics.pop('logits_real'),
    'logits_fake': jnp.mean(logits_fake),
    'ae_grad_norm': optax.global_norm(ae_grads),
    'disc_grad_norm': optax.global_norm(d_grads),
    'codebook_usage': codes['usage'],
    'perplexity': codes['perplexity'],
    **d_metrics,
    **metrics,
    **term_metrics,
  }
  return new_state, metrics


def _codebook_updates(config, state, params, indices, latents, t, key):
  """The code-level updates after the optimizer's: the usage record, then the quantizer's own
  (`QuantizerSpec.train_update`: the VQ's EMA codebook and dead-code restart, written into
  `params`, where inference reads it). `t`: this update's 1-based number; `key`: this step's
  restart key. Returns (params, state entries, metrics)."""
  out, metrics = {}, {}
  if 'code_last_used' not in state and 'quantizer' not in state:
    return params, out, metrics
  last_used = None
  if 'code_last_used' in state:
    last_used = quantizer_lib.mark_used(state['code_last_used'], indices, t)
    window = config.train.usage_window
    if window > 0:  # before any restart: re-seeded codes were not picked
      metrics['window_usage'] = quantizer_lib.window_usage(last_used, t, window)
  update = quantizer_lib.QUANTIZERS[config.model.quantizer].train_update
  if update is not None:
    stats = state['quantizer']['quantize'] if 'quantizer' in state else None
    quantize, stats, last_used, more = update(
      config.model, params['quantize'], stats, latents, indices, last_used, t, key
    )
    if quantize is not params['quantize']:
      params = dict(params, quantize=quantize)
    metrics.update(more)
    if stats is not None:
      out['quantizer'] = {'quantize': stats}
  if last_used is not None:
    out['code_last_used'] = last_used
  return params, out, metrics


def make_train_step(config, models: Models, mesh, state_shardings, lpips_shardings):
  disc_start = losses.resolve_disc_start(config.loss.disc_start, config.train.num_steps)
  fn = functools.partial(train_step, config, models, disc_start)
  return jax.jit(
    fn,
    in_shardings=(state_shardings, lpips_shardings, parallel.batch_sharding(mesh)),
    out_shardings=(state_shardings, parallel.replicated(mesh)),
    donate_argnums=(0,),
  )
