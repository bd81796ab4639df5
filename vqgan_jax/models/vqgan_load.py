"""The VQGAN family's loading layer: the stage-1 models built from a config (`build_models`),
the VQGAN's parameter shardings, and its params read from a stage-1 run
(`restore_vqgan_params`) with the identity of what was read (`tokenizer_identity`).

The loaders, the modes (encode, eval, sample), the converter and the trainers all build on
this; it imports nothing from `train/`.
"""

import os
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vqgan_jax import checkpoints
from vqgan_jax import fingerprint
from vqgan_jax import parallel
from vqgan_jax.kernels import dtype_choice
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.models import vqgan as vqgan_lib
from vqgan_jax.models.discriminator import NLayerDiscriminator
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
  dtype = DTYPES[dtype_choice.resolve(config.train.dtype, 'vqgan')]
  impl = config.train.conv_impl
  remat = remat_policy_name(config)
  vqgan = vqgan_lib.from_config(config.model, dtype=dtype, remat_policy=remat, conv_impl=impl)
  disc = NLayerDiscriminator(
    ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers, dtype=dtype, conv_impl=impl
  )
  return Models(vqgan, disc, lpips_lib.LPIPS(dtype=dtype, conv_impl=impl))


def to_model_range(images):
  return images.astype(jnp.float32) / 127.5 - 1.0


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


def restore_vqgan_params(workdir, vqgan, mesh, rules=(), step=None, ema=True, with_key=False):
  """A stage-1 run's VQGAN params (latest step by default), read straight into their
  shardings on `mesh` (any mesh and process count).

  ema: the EMA of the generator's params when the run kept one (`params_ema`, with
  config.train.params_ema_decay > 0), as `inference.load_vqgan` reads it, so --mode=encode,
  stage 2 and the loader see the same first stage; otherwise (and with ema=False) `params`.
  with_key: return (params, the state key read: 'params_ema' or 'params').
  """
  abstract, shardings = vqgan_param_shardings(vqgan, mesh, rules)
  target = checkpoints.abstract_like(abstract, shardings)
  keyed = lambda key: (checkpoints.restore_params(workdir, target, key=key, step=step), key)
  out = None
  if ema:
    try:
      out = keyed('params_ema')
    except checkpoints.CheckpointError:
      pass  # The run kept no EMA copy.
  out = out or keyed('params')
  return out if with_key else out[0]


def latest_step(workdir):
  """The latest step of a stage-1 run, or None when it has no checkpoint."""
  if not workdir or not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    return None
  with checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None) as ckpt:
    return ckpt.latest_step()


def tokenizer_identity(workdir, params, key):
  """What identifies the stage-1 params that encode codes (and decode what stage 2 samples):
  a codes dataset records it (--mode=encode) and stage 2 compares it with its stage 1.

  Only `params_sha256` (`fingerprint.params_fingerprint`) decides; the run's path, step and
  whether the EMA params were read say where they came from (a moved or copied run is the
  same tokenizer).
  """
  return {
    'workdir': os.path.abspath(workdir),
    'step': latest_step(workdir),
    'ema': key == 'params_ema',
    'params_sha256': fingerprint.params_fingerprint(params),
  }
