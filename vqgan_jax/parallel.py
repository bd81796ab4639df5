"""Device mesh, and the shardings of parameters, optimizer state and batches.

The mesh has named axes ('data', 'fsdp'): the batch is split over both; parameters and
optimizer state are split over 'fsdp' (ZeRO-3 style) along their largest divisible
dimension and replicated over 'data'. The same code runs on 1 CPU, fake CPU devices, a GPU
or a pod; only the config's axis sizes change.
"""

import math
from typing import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqgan_jax.validate import ConfigError

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int):
  """Resolves one -1 entry to the remaining devices; checks the product."""
  sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f'config.mesh: at most one axis may be -1, got {dict(sizes)}')
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if num_devices % known:
      raise ConfigError(f'config.mesh: {dict(sizes)} does not divide {num_devices} devices')
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(
        f'config.mesh: axis sizes {dict(sizes)} multiply to {math.prod(sizes.values())}, '
        f'but there are {num_devices} devices')
  return sizes


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over `devices` (default: all). Axes are Auto: XLA propagates shardings through
  the convolutions; only inputs, parameters and outputs are annotated."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(axis_sizes, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=devices)


def fsdp_spec(shape, fsdp_size: int, min_size: int = 2 ** 12) -> P:
  """Shards the largest dimension divisible by the fsdp axis; small arrays stay replicated."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for a pytree of arrays (params, optimizer state, stats, scalars)."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)
