"""Device mesh, logical-axis rules, and the shardings of parameters, optimizer state and
batches, for both stages.

One mesh, axes ('data', 'fsdp', 'tensor') (`config.mesh`; 'tensor' defaults to 1). The batch
is split over data x fsdp. Parameters and optimizer state (its moments shard like their
parameters) are placed by one table of logical-axis rules, `config.logical_axis_rules`
(logical axis -> mesh axis, tuple of mesh axes, or None; `config_base.logical_axis_rules`):

* stage 2 (the GPT) annotates its parameters with logical axes (`embed`, `heads`, `mlp`,
  `vocab`, `layers`) and its activations (`batch`, `length`, `act_embed`) inside the model,
  maxtext-style; `embed -> fsdp` is its ZeRO-3 sharding, `heads/mlp/vocab -> tensor` its
  Megatron tensor parallelism.
* stage 1 (VQGAN, discriminator, the frozen VQGANs of stage 2) is a conv net whose parameter
  names must stay the original's; its kernels get logical axes from their layout here, not
  from annotations in the modules (`stage1_logical_axes`: HWIO conv and (in, out) Dense
  kernels -> (..., 'conv_in', 'conv_out'), the codebook -> ('codebook', None)). After the
  rules are applied, an array that no rule put on 'fsdp' is split over 'fsdp' along its largest
  remaining divisible dimension (big_vision's fsdp strategy), and arrays under 4096 elements
  stay replicated. With the default rules (conv_out -> tensor) and tensor=1 this is exactly
  the plain ZeRO-3 layout; with tensor > 1 each conv's output channels are split over it.

Mesh axes of size 1 are dropped from stage-1 specs. The same code runs on 1 CPU, fake CPU
devices, a GPU or a pod; only the config's axis sizes (and, if wanted, rules) change.
"""

import math
from typing import Mapping

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from vqgan_jax import config_base
from vqgan_jax.validate import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
MIN_SHARDED_SIZE = 2**12


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int):
  """Resolves one -1 entry to the remaining devices; checks the product. Absent axes are 1."""
  unknown_axes = sorted(set(axis_sizes) - set(MESH_AXES))
  if unknown_axes:
    raise ConfigError(
      f'config.mesh: unknown axis {unknown_axes[0]!r}; the mesh axes are {MESH_AXES}'
    )
  sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
  bad = {a: s for a, s in sizes.items() if s < 1 and s != -1}
  if bad:
    raise ConfigError(f'config.mesh: axis sizes must be >= 1 (or one -1), got {bad}')
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
      f'but there are {num_devices} devices'
    )
  return sizes


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), for either stage.
  Axes are Auto: XLA propagates shardings through the model; only inputs, parameters,
  outputs (and the GPT's logical activation constraints) are annotated."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(axis_sizes, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices
  )


# ----------------------------------------------------------------------------------------
# Logical-axis rules
# ----------------------------------------------------------------------------------------


def normalize_rules(rules, field='config.logical_axis_rules'):
  """Rules as a tuple of (logical, None | mesh axis | tuple of mesh axes), checked.

  Accepts lists (a config restored from JSON) as well as tuples.
  """
  out = []
  for item in rules or ():
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
      raise ConfigError(f'{field}: each rule is a (logical axis, mesh axes) pair, got {item!r}')
    logical, axes = item
    if axes is not None and not isinstance(axes, str):
      axes = tuple(axes)
    for a in (axes,) if isinstance(axes, str) else axes or ():
      if a not in MESH_AXES:
        raise ConfigError(
          f'{field}: rule {logical!r} names mesh axis {a!r}; the mesh axes are {MESH_AXES}'
        )
    out.append((logical, axes))
  return tuple(out)


def axis_rules(config):
  """The run's logical-axis rules (`config.logical_axis_rules`), checked."""
  if config.get('logical_axis_rules') is None:
    raise ConfigError(
      'config.logical_axis_rules is missing (vqgan_jax/config_base.py has the default table)'
    )
  return normalize_rules(config.logical_axis_rules)


# The config table, for models used without a config (tests, notebooks).
DEFAULT_RULES = normalize_rules(config_base.logical_axis_rules())


def _rule_axes(logical, rules):
  """The mesh axes (a tuple, possibly empty) of the first rule for `logical`."""
  if logical is None:
    return ()
  for name, axes in rules:
    if name == logical:
      return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return ()


def logical_spec(shape, logical_axes, rules, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE) -> P:
  """The PartitionSpec of one array with logical axes `logical_axes` under `rules`.

  Mesh axes of size 1, absent from the mesh, already used by an earlier dimension, or not
  dividing the dimension are dropped. If no rule placed the array on 'fsdp', its largest
  remaining divisible dimension goes there. Arrays under `min_size` elements are replicated.
  """
  if math.prod(shape) < min_size:
    return P()
  dims, used = [None] * len(shape), set()
  for d, logical in enumerate(tuple(logical_axes)[: len(shape)]):
    axes = tuple(
      a for a in _rule_axes(logical, rules) if mesh.shape.get(a, 1) > 1 and a not in used
    )
    if axes and shape[d] % math.prod(mesh.shape[a] for a in axes) == 0:
      dims[d] = axes[0] if len(axes) == 1 else axes
      used.update(axes)
  fsdp = mesh.shape.get('fsdp', 1)
  if 'fsdp' not in used and fsdp > 1:
    free = [d for d in range(len(shape)) if dims[d] is None and shape[d] % fsdp == 0]
    if free:
      dims[max(free, key=lambda d: (shape[d], -d))] = 'fsdp'
  return P(*dims)


def key_name(entry) -> str:
  """The name of one entry of a pytree path (a dict key, an attribute or an index)."""
  return str(getattr(entry, 'key', getattr(entry, 'name', entry)))


def stage1_logical_axes(path, shape):
  """Logical axes of a stage-1 array (VQGAN, discriminator; params or their Adam moments)
  from its layout: HWIO conv kernels (kh, kw, in, out) and Dense kernels (in, out) ->
  'conv_in', 'conv_out'; the codebook (n_embed, embed_dim) -> ('codebook', None); other
  arrays (biases, norms, statistics, counters) have none."""
  name = key_name(path[-1]) if path else ''
  if name == 'kernel' and len(shape) == 4:
    return (None, None, 'conv_in', 'conv_out')
  if name == 'kernel' and len(shape) == 2:
    return ('conv_in', 'conv_out')
  if name == 'embedding' and len(shape) == 2:
    return ('codebook', None)
  return (None,) * len(shape)


def state_shardings(abstract_state, mesh: Mesh, rules=()):
  """NamedShardings for a stage-1 pytree of arrays (params, optimizer state, stats,
  scalars): `stage1_logical_axes` under `rules`, then fsdp on the largest free dimension.
  rules=() (the default) is plain ZeRO-3 over 'fsdp'."""
  rules = normalize_rules(rules)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: NamedSharding(
      mesh, logical_spec(x.shape, stage1_logical_axes(path, x.shape), rules, mesh)
    ),
    abstract_state,
  )


def mesh_rules(mesh, rules=None):
  """`rules` restricted to the mesh's axes (a rule naming an absent axis maps to None)."""
  rules = DEFAULT_RULES if rules is None else rules
  names = set(mesh.axis_names)
  out = []
  for logical, axes in rules:
    if axes is None:
      out.append((logical, None))
      continue
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in names)
    out.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
  return tuple(out)


def logical_shardings(boxed_tree, mesh, rules=None):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (params from `init`, or
  `jax.eval_shape` of it). A dimension the mapped mesh axes do not divide is replicated
  (e.g. vocab 33 over tensor=2); unannotated leaves are replicated."""
  rules = mesh_rules(mesh, rules)

  def one(leaf):
    if not isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, P())
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    dims = []
    for size, axes in zip(leaf.value.shape, tuple(spec) + (None,) * leaf.value.ndim):
      n = (
        math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        if axes is not None
        else 1
      )
      dims.append(axes if axes is not None and size % n == 0 else None)
    return NamedSharding(mesh, P(*dims))

  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def gather(x) -> np.ndarray:
  """The whole of `x` as numpy on every process: a global jax.Array's value however it is
  sharded, or a process-local numpy batch gathered in process order."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
