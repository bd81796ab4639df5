"""Config checks that run before anything is compiled: one clear sentence per problem."""

import math

import jax.numpy as jnp

from vqgan_jax.kernels.conv import IMPLS as CONV_IMPLS
from vqgan_jax.models import quantizer as quantizer_lib
from vqgan_jax.models.layers import REMAT_POLICIES
from vqgan_jax.models.quantizer import QUANTIZERS

# config.train.dtype -> the compute dtype (parameters, optimizer state and losses stay float32);
# 'auto' is the one measured faster for the stage on this machine (kernels/dtype_choice.py).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
DTYPE_NAMES = (*DTYPES, 'auto')


class ConfigError(ValueError):
  """A config field holds a value the model or the run cannot use."""


def check(cond, msg):
  """Raises ConfigError(msg) unless `cond`."""
  if not cond:
    raise ConfigError(msg)


def validate_remat(section, field, modes, policy_as_mode=False):
  """`section.remat` in `modes` (or, with `policy_as_mode`, a policy name: the older stage-2
  spelling) and `section.remat_policy` a policy usable by name."""
  remat = section.get('remat', 'none')
  allowed = tuple(modes) + (REMAT_POLICIES if policy_as_mode else ())
  check(
    remat in allowed,
    f'{field}.remat must be one of {modes}'
    + (' (or a policy name)' if policy_as_mode else '')
    + f', got {remat!r}',
  )
  policy = section.get('remat_policy', 'nothing_saveable')
  check(
    policy in REMAT_POLICIES,
    f'{field}.remat_policy must be one of {REMAT_POLICIES}, got {policy!r}',
  )


# The fields that decide the quantizer's params and codes: `init_from` needs them equal.
QUANTIZER_FIELDS = tuple(f'model.{f}' for f in quantizer_lib.shape_fields())


def _fraction(value, field, upper_open=True):
  """A decay in [0, 1)."""
  check(
    0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0,
    f'{field} must be in [0, {"1)" if upper_open else "1]"}, got {value}',
  )


def validate_quantizer(m):
  """config.model's quantizer fields: the name, the fields other quantizers own left off
  (`QuantizerSpec.options`), then the quantizer's own checks (`QuantizerSpec.validate`)."""
  quantizer = m.quantizer
  check(
    quantizer in QUANTIZERS,
    f'config.model.quantizer must be one of {tuple(QUANTIZERS)}, got {quantizer!r}',
  )
  for other, spec in QUANTIZERS.items():
    for name, off in spec.options.items():
      check(
        other == quantizer or m[name] == off,
        f'config.model.{name}={m[name]!r} applies to quantizer={other!r} only '
        f'(this config has {quantizer!r}); set it to {off!r}',
      )
  error = next(iter(QUANTIZERS[quantizer].validate(m)), None)
  check(error is None, error)


def validate_gan_and_health(loss, t):
  """config.loss's GAN/entropy fields and config.train's EMA-params and codebook-health fields."""
  for name in ('lecam_weight', 'r1_weight', 'entropy_weight', 'entropy_anneal_steps'):
    check(loss[name] >= 0, f'config.loss.{name} must be >= 0, got {loss[name]}')
  check(loss.disc_weight >= 0, f'config.loss.disc_weight must be >= 0, got {loss.disc_weight}')
  _fraction(loss.lecam_decay, 'config.loss.lecam_decay')
  temperature = loss.entropy_temperature
  check(temperature > 0, f'config.loss.entropy_temperature must be > 0, got {temperature}')
  factor = loss.entropy_anneal_factor
  check(factor >= 1, f'config.loss.entropy_anneal_factor must be >= 1, got {factor}')
  _fraction(t.params_ema_decay, 'config.train.params_ema_decay')
  check(t.usage_window >= 0, f'config.train.usage_window must be >= 0, got {t.usage_window}')
  _fraction(t.usage_warning, 'config.train.usage_warning', upper_open=False)


def validate_train_counts(t, base_lr, batch_divisor):
  """Both stages' config.train (t): batch sizes that split over the mesh's batch axes, counts
  >= 1; and a positive config.optim.base_lr."""
  for name in ('batch_size', 'eval_batch_size'):
    check(
      t[name] % batch_divisor == 0,
      f'config.train.{name}={t[name]} is not divisible by the {batch_divisor} devices '
      "of the mesh's batch axes (config.mesh.data x config.mesh.fsdp)",
    )
  for name in ('num_steps', 'log_every', 'eval_every', 'checkpoint_every'):
    check(t[name] >= 1, f'config.train.{name} must be >= 1, got {t[name]}')
  check(
    math.isfinite(base_lr) and base_lr > 0,
    f'config.optim.base_lr must be a positive number, got {base_lr}',
  )


def validate_stage1(config, batch_divisor: int = 1):
  m, d, t, loss = config.model, config.data, config.train, config.loss
  check(len(m.ch_mult) >= 1, 'config.model.ch_mult must have at least one level')
  factor = 2 ** (len(m.ch_mult) - 1)
  for name in ('resolution',):
    check(
      m[name] % factor == 0,
      f'config.model.{name}={m[name]} is not divisible by the downsampling factor '
      f'{factor} (2**(len(ch_mult)-1) with ch_mult={tuple(m.ch_mult)})',
    )
  check(
    d.image_size % factor == 0,
    f'config.data.image_size={d.image_size} is not divisible by the downsampling factor '
    f'{factor} of config.model.ch_mult={tuple(m.ch_mult)}',
  )
  for i, mult in enumerate(m.ch_mult):
    c = m.ch * mult
    check(
      c % 32 == 0,
      f'config.model.ch * ch_mult[{i}] = {m.ch} * {mult} = {c} channels is not divisible '
      'by 32 (GroupNorm uses 32 groups)',
    )
  for name in ('n_embed', 'embed_dim', 'z_channels', 'num_res_blocks'):
    check(m[name] >= 1, f'config.model.{name} must be >= 1, got {m[name]}')
  validate_quantizer(m)
  check(
    m.in_channels in (1, 3) and m.out_ch == m.in_channels,
    f'config.model.in_channels/out_ch must both be 1 or 3, got {m.in_channels}/{m.out_ch}',
  )
  check(
    loss.disc_loss in ('hinge', 'vanilla'),
    f"config.loss.disc_loss must be 'hinge' or 'vanilla', got {loss.disc_loss!r}",
  )
  check(loss.disc_num_layers >= 1, 'config.loss.disc_num_layers must be >= 1')
  check(loss.disc_start >= 0, f'config.loss.disc_start must be >= 0, got {loss.disc_start}')
  validate_gan_and_health(loss, t)
  check(t.dtype in DTYPE_NAMES, f'config.train.dtype must be one of {DTYPE_NAMES}, got {t.dtype!r}')
  check(
    t.conv_impl in CONV_IMPLS,
    f'config.train.conv_impl must be one of {CONV_IMPLS}, got {t.conv_impl!r}',
  )
  validate_remat(t, 'config.train', ('none', 'block'))
  validate_train_counts(t, config.optim.base_lr, batch_divisor)
