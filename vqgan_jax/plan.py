"""Memory planner: will this config fit that mesh? Answered without the hardware.

  python -m vqgan_jax.plan --config=configs/imagenet_vqgan_f16_16384.py --mesh=data=16,fsdp=4 \
      --device_memory_gb=80

Compiles the real train step ahead of time for a virtual mesh of N fake CPU devices (no
accelerator needed) and prints, per device: parameter, optimizer-state and other state
bytes (from the shardings), the step's temporary (activation) bytes and its peak (from the
compiled memory analysis), and the largest global batch that fits `--device_memory_gb`.
Accelerator compilers fuse and schedule differently from XLA:CPU, so activation figures
are estimates of the right order, not promises; state bytes are exact.
"""

import json
import math
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, 'configs')) and _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_MESH = flags.DEFINE_string('mesh', 'data=8', 'Mesh axis sizes, e.g. data=16,fsdp=4.')
_MEMORY = flags.DEFINE_float('device_memory_gb', 80.0, 'Memory of one device, GiB.')
_SEARCH = flags.DEFINE_bool('search_batch', True, 'Also find the largest batch that fits.')

GIB = 2.0 ** 30


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
  rng = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(lambda r: stage1.init_state(config, models, r), rng)
  shardings = parallel.state_shardings(abstract, mesh)
  lpips_params = lpips_lib.load_pretrained_params()
  lpips_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lpips_params)
  lpips_sh = jax.tree.map(lambda _: parallel.replicated(mesh), lpips_params)
  step = stage1.make_train_step(config, models, mesh, shardings, lpips_sh)

  def args(batch):
    s = config.data.image_size
    images = jax.ShapeDtypeStruct((batch, s, s, config.model.in_channels), jnp.uint8,
                                  sharding=parallel.batch_sharding(mesh))
    return (abstract, lpips_abstract, images)

  groups = {
      'params': (abstract['params'], shardings['params']),
      'opt_state': (abstract['opt_state'], shardings['opt_state']),
      'disc_params+stats+opt': (
          (abstract['disc_params'], abstract['disc_stats'], abstract['disc_opt_state']),
          (shardings['disc_params'], shardings['disc_stats'], shardings['disc_opt_state'])),
      'lpips_params': (lpips_abstract, lpips_sh),
  }
  return step, args, groups


PROGRAMS = {'vqgan': stage1_program}


def compile_memory(step, args, batch):
  stats = step.lower(*args(batch)).compile().memory_analysis()
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return {'argument_bytes': stats.argument_size_in_bytes,
          'output_bytes': stats.output_size_in_bytes,
          'alias_bytes': stats.alias_size_in_bytes,
          'temp_bytes': stats.temp_size_in_bytes,
          'peak_bytes': peak}


def plan(config, mesh_sizes, device_memory_gb, search_batch=True):
  import jax  # pylint: disable=g-import-not-at-top
  from vqgan_jax import parallel  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(mesh_sizes)
  if config.stage not in PROGRAMS:
    raise app.UsageError(f'config.stage={config.stage!r}: the planner knows {sorted(PROGRAMS)}')
  step, args, groups = PROGRAMS[config.stage](config, mesh)
  divisor = parallel.batch_divisor(mesh)
  batch = config.train.batch_size
  if batch % divisor:
    batch = divisor * max(1, round(batch / divisor))
  report = {
      'config_stage': config.stage,
      'mesh': dict(mesh.shape), 'num_devices': mesh.size,
      'global_batch': batch,
      'state_bytes_per_device': {k: _tree_bytes_per_device(a, s) for k, (a, s) in groups.items()},
      'num_params': sum(math.prod(x.shape) for x in jax.tree.leaves(groups['params'][0])),
  }
  report.update(compile_memory(step, args, batch))
  budget = device_memory_gb * GIB
  report['device_memory_bytes'] = int(budget)
  report['fits'] = report['peak_bytes'] <= budget
  if search_batch:
    # temp(b) is affine in the batch: two compiles give the slope, a third checks the answer.
    b2 = 2 * batch
    peak2 = compile_memory(step, args, b2)['peak_bytes']
    per_example_group = max((peak2 - report['peak_bytes']) / (b2 - batch), 1.0)
    fixed = report['peak_bytes'] - per_example_group * batch
    best = int((budget - fixed) // per_example_group) // divisor * divisor
    report['per_batch_increment_bytes'] = per_example_group
    if best >= divisor:
      check = compile_memory(step, args, best)['peak_bytes']
      while best > divisor and check > budget:
        best -= divisor
        check = compile_memory(step, args, best)['peak_bytes']
      report['max_global_batch'] = best
      report['max_global_batch_peak_bytes'] = check
    else:
      report['max_global_batch'] = 0
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sizes = parse_mesh(_MESH.value)
  n = math.prod(v for v in sizes.values() if v > 0)
  import jax  # pylint: disable=g-import-not-at-top
  # Fake CPU devices stand in for the accelerators; set before the backend starts.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', n)
  report = plan(_CONFIG.value, sizes, _MEMORY.value, _SEARCH.value)
  gib = {k: round(v / GIB, 3) for k, v in report.items()
         if k.endswith('bytes') and isinstance(v, (int, float))}
  report['state_gib_per_device'] = {k: round(v / GIB, 3)
                                    for k, v in report['state_bytes_per_device'].items()}
  report.update({k.replace('bytes', 'gib'): v for k, v in gib.items()})
  print(json.dumps(report))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
