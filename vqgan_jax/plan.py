"""Memory planner: will this config fit that mesh? Answered without the hardware.

  python -m vqgan_jax.plan --config=configs/imagenet_vqgan_f16_16384.py --mesh=data=16,fsdp=4 \
      --device_memory_gb=80
  python -m vqgan_jax.plan --config=configs/imagenet_cin_transformer.py --mesh=data=16,fsdp=4 \
      --config.transformer.remat=block

Both stages: the config's `stage` picks the program (stage 1: the fused VQGAN + discriminator
step; stage 2: the GPT step on codes, or on images with the frozen encoder when
data.source='images'). It compiles the real train step ahead of time for a virtual
('data', 'fsdp', 'tensor') mesh of N fake CPU devices (no accelerator needed), sharded by the
config's logical-axis rules, and prints one JSON line, per device: parameter, optimizer-state
and other state bytes (from the shardings), the step's temporary (activation) bytes and its
peak (from the compiled memory analysis), and the largest global batch that fits
`--device_memory_gb`. The settings that change memory (compute dtype, the dtype of the
parameters/master weights, remat and its policy, scanned layers) are part of the output; set
them with `--config.` overrides.

Accelerator compilers fuse and schedule differently from XLA:CPU, so activation figures are
estimates of the right order, not promises; state bytes are exact. XLA:CPU's default
scheduler optimises for parallelism, not memory; the planner switches it to the
memory-minimising one (`--memory_scheduler`, on by default), closer to what the accelerator
schedulers do. Even so, XLA:CPU does not turn rematerialisation of *unrolled* blocks (stage 1's
ResnetBlocks) into lower temp memory, so the planner under-reports stage-1 remat savings;
scanned layers (stage 2) are rematerialised inside the loop, and there the saving shows.
"""

import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_MESH = flags.DEFINE_string('mesh', 'data=8', 'Mesh axis sizes, e.g. data=16,fsdp=4.')
_MEMORY = flags.DEFINE_float('device_memory_gb', 80.0, 'Memory of one device, GiB.')
_SEARCH = flags.DEFINE_bool('search_batch', True, 'Also find the largest batch that fits.')
_MEMORY_SCHEDULER = flags.DEFINE_bool(
  'memory_scheduler',
  True,
  "Use XLA:CPU's memory-minimising scheduler (not the concurrency-optimised default).",
)

GIB = 2.0**30
MEMORY_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def parse_mesh(spec: str):
  sizes = {}
  for item in filter(None, spec.split(',')):
    name, _, value = item.partition('=')
    if not value.strip().lstrip('-').isdigit():
      raise app.UsageError(f'--mesh: expected axis=size items, got {item!r}')
    sizes[name.strip()] = int(value)
  return sizes


def _tree_bytes_per_device(abstract, shardings):
  import jax  # pylint: disable=g-import-not-at-top

  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard = s.shard_shape(x.shape)
    total += math.prod(shard) * x.dtype.itemsize
  return total


def stage1_program(config, mesh):
  """(jitted step, abstract args, {name: (abstract subtree, shardings)}) for stage 1."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from vqgan_jax import parallel  # pylint: disable=g-import-not-at-top
  from vqgan_jax.models import lpips as lpips_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import stage1  # pylint: disable=g-import-not-at-top

  models = stage1.build_models(config)
  abstract, shardings, _ = stage1.state_setup(config, models, mesh, jax.random.PRNGKey(0))
  lpips_params = lpips_lib.load_pretrained_params()
  lpips_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lpips_params)
  lpips_sh = jax.tree.map(lambda _: parallel.replicated(mesh), lpips_params)
  step = stage1.make_train_step(config, models, mesh, shardings, lpips_sh)

  def args(batch):
    s = config.data.image_size
    images = jax.ShapeDtypeStruct(
      (batch, s, s, config.model.in_channels), jnp.uint8, sharding=parallel.batch_sharding(mesh)
    )
    return (abstract, lpips_abstract, images)

  groups = {
    'params': (abstract['params'], shardings['params']),
    'opt_state': (abstract['opt_state'], shardings['opt_state']),
    'disc_params+stats+opt': (
      (abstract['disc_params'], abstract['disc_stats'], abstract['disc_opt_state']),
      (shardings['disc_params'], shardings['disc_stats'], shardings['disc_opt_state']),
    ),
    'lpips_params': (lpips_abstract, lpips_sh),
  }
  settings = {
    'compute_dtype': config.train.dtype,
    'param_dtype': _dtypes(abstract['params']),
    'remat': config.train.get('remat', 'none'),
    'remat_policy': stage1.remat_policy_name(config),
  }
  return step, args, groups, settings


def stage2_program(config, mesh):
  """(jitted step, abstract args, state groups, settings) for the stage-2 transformer (the GPT
  or MaskGIT, per config.transformer.kind: the same state, batch and sharding rules)."""
  import functools  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from vqgan_jax import parallel  # pylint: disable=g-import-not-at-top
  from vqgan_jax.models import gpt_load  # pylint: disable=g-import-not-at-top
  from vqgan_jax.models import vqgan as vqgan_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import stage1  # pylint: disable=g-import-not-at-top
  from vqgan_jax.train import stage2  # pylint: disable=g-import-not-at-top

  config = gpt_load.resolve_config(config)
  gpt_load.validate_config(config)  # the batch is rounded to the mesh below
  layout = gpt_load.make_layout(config)
  model = gpt_load.build_model(config, layout)
  tx, schedule = stage2.make_optimizer(config)
  rules = parallel.axis_rules(config)
  rng = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(functools.partial(stage2.init_state, model, tx), rng)
  shardings = stage2.gpt_state_shardings(model, tx, mesh, rng, rules)
  frozen, frozen_abstract, frozen_sh = stage2.Frozen(), {}, {}
  from_images = config.data.source == 'images'
  if from_images:  # the frozen stage-1 encoder runs inside the step
    vqgan = vqgan_lib.from_config(config.stage1_config, frozen=True)
    abstract_vq, sh_vq = stage1.vqgan_param_shardings(vqgan, mesh, rules)
    frozen_abstract, frozen_sh = {'stage1': abstract_vq}, {'stage1': sh_vq}
    frozen = stage2.Frozen(stage1=vqgan)
  step = stage2.make_train_step(
    config, model, layout, tx, schedule, mesh, shardings, frozen, frozen_sh or None
  )

  def args(batch):
    sh = parallel.batch_sharding(mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    inputs = {'label': spec((batch,), jnp.int32)}
    if from_images:
      s = config.data.image_size
      inputs['image'] = spec((batch, s, s, config.stage1_config.in_channels), jnp.uint8)
    else:
      inputs['codes'] = spec((batch, layout.image_len), jnp.int32)
    if layout.kind == 'spatial':
      inputs['cond_codes'] = spec((batch, layout.cond_len), jnp.int32)
    return (abstract, frozen_abstract, inputs)

  groups = {
    'params': (abstract['params'], shardings['params']),
    'opt_state': (abstract['opt_state'], shardings['opt_state']),
  }
  if from_images:
    groups['frozen_params'] = (frozen_abstract, frozen_sh)
  t = config.transformer
  settings = {
    'compute_dtype': config.train.dtype,
    'param_dtype': _dtypes(abstract['params']),
    'remat': t.get('remat', 'none'),
    'remat_policy': {False: None, True: 'nothing_saveable'}.get(
      gpt_load.gpt_remat(t), gpt_load.gpt_remat(t)
    ),
    'scan_layers': bool(t.scan_layers),
    'data_source': config.data.source,
    'model': {
      'kind': layout.transformer_kind,
      'n_layer': t.n_layer,
      'n_head': t.n_head,
      'n_embd': t.n_embd,
      'vocab_size': layout.vocab_size,
      'block_size': layout.block_size,
      'seq_len': layout.seq_len,
    },
  }
  return step, args, groups, settings


def _dtypes(tree):
  import jax  # pylint: disable=g-import-not-at-top

  names = sorted({str(x.dtype) for x in jax.tree.leaves(tree)})
  return names[0] if len(names) == 1 else names


PROGRAMS = {'vqgan': stage1_program, 'transformer': stage2_program}


def compile_memory(step, args, batch):
  stats = step.lower(*args(batch)).compile().memory_analysis()
  peak = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )
  return {
    'argument_bytes': stats.argument_size_in_bytes,
    'output_bytes': stats.output_size_in_bytes,
    'alias_bytes': stats.alias_size_in_bytes,
    'temp_bytes': stats.temp_size_in_bytes,
    'peak_bytes': peak,
  }


def largest_batch(measure, points, budget, divisor, max_compiles=12):
  """The largest multiple of `divisor` whose compiled peak fits `budget`.

  `points` ({batch: peak bytes}, at least two) grows with every compile. The peak is not
  quite affine in the batch (XLA packs small activations into the holes of fixed-size
  temporaries, so it can even stay flat over the first sizes), so the search alternates
  secant steps (through the two points nearest the budget) with bisection of the bracket
  [largest fitting, smallest failing], grows at most 16x per compile until a size fails
  (a secant through a flat stretch points orders of magnitude too far), and every answer is
  a compiled, checked size. Returns 0 if not even `divisor` fits.
  """
  for i in range(max_compiles):
    lo = max((b for b, p in points.items() if p <= budget), default=0)
    hi = min((b for b, p in points.items() if p > budget), default=None)
    if (hi is not None and hi - lo <= divisor) or (hi == divisor):
      break
    (b1, p1), (b2, p2) = sorted(sorted(points.items(), key=lambda bp: abs(bp[1] - budget))[:2])
    if hi is not None and lo and i % 2:
      guess = (lo + hi) // 2
    elif p2 > p1:
      guess = b2 + (budget - p2) * (b2 - b1) / (p2 - p1)
    else:
      guess = 2 * max(points)
    if hi is None:
      guess = min(guess, 16 * lo)
    guess = max(int(guess) // divisor * divisor, lo + divisor)
    if hi is not None:
      guess = min(guess, hi - divisor)
    if guess in points:  # the secant repeats itself: bisect (or double without a bracket)
      guess = (lo + hi) // 2 // divisor * divisor if hi is not None else 2 * max(points)
      guess = max(guess, lo + divisor)
    points[guess] = measure(guess)
  return max((b for b, p in points.items() if p <= budget), default=0)


def plan(config, mesh_sizes, device_memory_gb, search_batch=True):
  import jax  # pylint: disable=g-import-not-at-top

  from vqgan_jax import parallel  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(mesh_sizes)
  if config.stage not in PROGRAMS:
    raise app.UsageError(f'config.stage={config.stage!r}: the planner knows {sorted(PROGRAMS)}')
  step, args, groups, settings = PROGRAMS[config.stage](config, mesh)
  divisor = parallel.batch_divisor(mesh)
  batch = config.train.batch_size
  if batch % divisor:
    batch = divisor * max(1, round(batch / divisor))
  report = {
    'config_stage': config.stage,
    'mesh': dict(mesh.shape),
    'num_devices': mesh.size,
    'settings': settings,
    'global_batch': batch,
    'state_bytes_per_device': {k: _tree_bytes_per_device(a, s) for k, (a, s) in groups.items()},
    'num_params': sum(math.prod(x.shape) for x in jax.tree.leaves(groups['params'][0])),
  }
  t0 = time.perf_counter()
  report.update(compile_memory(step, args, batch))
  report['compile_s'] = round(time.perf_counter() - t0, 1)
  budget = device_memory_gb * GIB
  report['device_memory_bytes'] = int(budget)
  report['fits'] = report['peak_bytes'] <= budget
  if search_batch:
    measure = lambda b: compile_memory(step, args, b)['peak_bytes']
    points = {batch: report['peak_bytes'], 2 * batch: measure(2 * batch)}
    slope = max((points[2 * batch] - points[batch]) / batch, 1.0)
    report['per_batch_increment_bytes'] = slope
    report['fixed_bytes'] = points[batch] - slope * batch
    best = largest_batch(measure, points, budget, divisor)
    report['max_global_batch'] = best
    if best:
      report['max_global_batch_peak_bytes'] = points[best]
    report['search_points'] = {str(b): p for b, p in sorted(points.items())}
  return report


def summary(report):
  """A few human-readable lines of a report."""
  g = lambda b: f'{b / GIB:.2f} GiB'
  st = report['settings']
  state = ', '.join(f'{k} {g(v)}' for k, v in report['state_bytes_per_device'].items())
  lines = [
    f'{report["config_stage"]}: {report["num_params"] / 1e6:.1f}M params on mesh '
    f'{report["mesh"]}; compute {st["compute_dtype"]}, params {st["param_dtype"]}, remat '
    f'{st["remat"]} ({st["remat_policy"]})',
    f'per device: {state}',
    f'global batch {report["global_batch"]}: temp {g(report["temp_bytes"])}, peak '
    f'{g(report["peak_bytes"])}',
  ]
  if 'max_global_batch' in report:
    lines.append(
      f'largest global batch within {g(report["device_memory_bytes"])}: '
      f'{report["max_global_batch"]} (peak '
      f'{g(report.get("max_global_batch_peak_bytes", 0))})'
    )
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sizes = parse_mesh(_MESH.value)
  n = math.prod(v for v in sizes.values() if v > 0)
  if _MEMORY_SCHEDULER.value:
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') + ' ' + MEMORY_SCHEDULER_FLAG
    ).strip()
  import jax  # pylint: disable=g-import-not-at-top

  # Fake CPU devices stand in for the accelerators; set before the backend starts.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', n)
  report = plan(_CONFIG.value, sizes, _MEMORY.value, _SEARCH.value)
  report['xla_cpu_scheduler'] = 'memory' if _MEMORY_SCHEDULER.value else 'default'
  print(summary(report), file=sys.stderr)
  gib = {
    k: round(v / GIB, 3)
    for k, v in report.items()
    if k.endswith('bytes') and isinstance(v, (int, float))
  }
  report['state_gib_per_device'] = {
    k: round(v / GIB, 3) for k, v in report['state_bytes_per_device'].items()
  }
  report.update({k.replace('bytes', 'gib'): v for k, v in gib.items()})
  print(json.dumps(report))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
