"""Checks of the Python API's arguments: images, code indices, condition tokens, class ids,
sample counts, and whether a batch fits the memory it will run in.

Every public entry point (`inference`, `sampling`, `maskgit_sampling`) calls these on its
concrete host inputs before anything compiles or allocates, so bad input is one ValueError
naming the argument and what it allows, never codes computed from garbage. Each argument is
checked once, by the entry point the user called: the samplers' unchecked cores
(`sampling.images_of`, `maskgit_sampling.images_of`, ...) that the other entry points run
take checked arguments. Jitted internals never call them (a check there would sync the
device every step); traced values pass.
"""

import math
import numbers
import os

import jax
import numpy as np

# Float images are [-1, 1]; the tolerance admits resampling overshoot and round-off, while
# images scaled [0, 255] (the common mistake) land far outside it.
FLOAT_IMAGE_TOLERANCE = 0.01
_RANGE_HINT = 'expected uint8 in [0, 255] or float in [-1, 1]'


def count(value, name):
  """A positive Python or numpy int (not a bool, not a float): how many samples to draw."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}')
  return int(value)


def integers(values, name, lo, hi, *, also=(), what='values'):
  """`values` as an int32 host array: integer-valued (an integral float is fine) and in
  [lo, hi) or one of `also`. Traced values are returned unchecked."""
  if isinstance(values, jax.core.Tracer):
    return values
  a = np.asarray(values)
  allowed = f'[{lo}, {hi})' + ''.join(f' or {v}' for v in also)
  if a.dtype == np.bool_ or not (
    np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
  ):
    raise ValueError(f'{name}: {what} must be integers in {allowed}, got dtype {a.dtype}')
  if np.issubdtype(a.dtype, np.floating):
    bad = ~np.isfinite(a) | (a != np.round(a))
    if bad.any():
      raise ValueError(f'{name}: {what} must be integers in {allowed}, got {a[bad].flat[0]}')
  out = (a < lo) | (a >= hi)
  for v in also:
    out &= a != v
  if out.any():
    shown = sorted({int(v) for v in a[out].flat})
    more = ' ...' if len(shown) > 8 else ''
    raise ValueError(f'{name}: {what} {shown[:8]}{more} are outside {allowed}')
  return a.astype(np.int32)


def nonempty_batch(shape, name):
  if not shape or not shape[0]:
    raise ValueError(f'{name} is an empty batch (shape {tuple(shape)}): pass at least one')


def images(values, name='images', *, channels, factor=1):
  """NHWC images ready for the encoder: uint8 (any integer dtype with values in [0, 255]) or
  finite floats in [-1, 1]; gray (N, H, W) or (N, H, W, 1) is repeated for an RGB model. H and
  W must divide by the encoder's downsampling `factor`."""
  x = np.asarray(values)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim == 4 and x.shape[-1] == 1 and channels == 3:
    x = np.repeat(x, 3, axis=-1)  # Gray images as the data pipeline feeds them: RGB.
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(
      f'{name} must be (N, H, W, {channels}) (NHWC; {_RANGE_HINT}), got shape {np.shape(values)}'
    )
  nonempty_batch(x.shape, name)
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(
      f'{name}: size {x.shape[1]}x{x.shape[2]} is not divisible by the downsampling factor {factor}'
    )
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.integer):
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 255:
      raise ValueError(f'{name}: {x.dtype} values in [{lo}, {hi}], outside [0, 255]; {_RANGE_HINT}')
    return x.astype(np.uint8)
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f'{name}: dtype {x.dtype}; {_RANGE_HINT}')
  if not np.isfinite(x).all():
    raise ValueError(f'{name} holds NaN or Inf values; {_RANGE_HINT}')
  lo, hi = float(x.min()), float(x.max())
  tol = FLOAT_IMAGE_TOLERANCE
  if lo < -1 - tol or hi > 1 + tol:
    raise ValueError(
      f'{name}: float values in [{lo:.4g}, {hi:.4g}], outside [-1, 1]; {_RANGE_HINT} '
      '(floats in [0, 255]: pass x.astype(np.uint8); decoder outputs: np.clip(x, -1, 1))'
    )
  return x.astype(np.float32)


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------


def _is_number(x):
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def nonnegative(value, name, note=''):
  """A finite number >= 0 (a temperature); unchecked when traced by the caller's own jit.
  `note` follows '>= 0' in the message."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be a number >= 0, got {value!r}') from e
  if not math.isfinite(v) or v < 0:
    raise ValueError(f'{name} must be >= 0{note}, got {value!r}')


def sampling_filters(temperature, top_k, top_p):
  """The samplers' filters: temperature >= 0 (unchecked when traced by the caller's own jit),
  top_k an int >= 0, top_p in (0, 1]; returns (top_k or None, top_p as a float)."""
  nonnegative(temperature, 'temperature', ' (0 is greedy argmax)')
  if top_k is not None and not (_is_number(top_k) and float(top_k).is_integer() and top_k >= 0):
    raise ValueError(f'top_k must be an integer >= 0 (0 or None: no top-k), got {top_k!r}')
  if top_p is not None and not (_is_number(top_p) and 0.0 < top_p <= 1.0):
    raise ValueError(f'top_p must be in (0, 1] (1 or None: no top-p), got {top_p!r}')
  return (int(top_k) if top_k else None), (1.0 if top_p is None else float(top_p))


def sequence_fits(block_size, cond_len, image_len, length_arg):
  """cond_len condition tokens and image_len sampled ones (set by the argument `length_arg`
  names) fit a model of `block_size` (the last sampled token is never fed back)."""
  if cond_len < 1 or image_len < 1:
    raise ValueError(
      f'need at least one conditioning token and one token to sample; got '
      f'{cond_len} cond tokens and {length_arg}'
    )
  if cond_len + image_len - 1 > block_size:
    raise ValueError(
      f'{length_arg} ({image_len} tokens after {cond_len} cond tokens) is longer '
      f"than the model's block_size {block_size} allows"
    )


def tokens(values, name, vocab_size):
  """(batch, length) tokens, a non-empty batch of ids in [0, vocab_size); returns the length
  (traced tokens: only the shape is checked)."""
  shape = np.shape(values)
  if len(shape) != 2:
    raise ValueError(f'{name} must be (batch, length) tokens, got shape {shape}')
  nonempty_batch(shape, name)
  integers(values, name, 0, vocab_size, what='token ids')
  return shape[1]


def condition(values, num_samples, vocab_size):
  """(Lc, the number of samples) of a sampler's `condition` ((B, Lc) or one (Lc,) token ids
  in [0, vocab_size)) and `num_samples` (a positive int repeating a single condition)."""
  shape = np.shape(values)
  if len(shape) not in (1, 2) or not shape[-1]:
    raise ValueError(f'condition must be (batch, length) or (length,) tokens, got shape {shape}')
  rows = 1 if len(shape) == 1 else shape[0]
  nonempty_batch((rows,), 'condition')
  integers(values, 'condition', 0, vocab_size, what='token ids')
  return shape[-1], repeats(rows, num_samples)


def repeats(rows, num_samples):
  """The number of samples `rows` conditions ask for; num_samples repeats a single one."""
  if num_samples is None:
    return rows
  n = count(num_samples, 'num_samples')
  if rows != 1:
    raise ValueError(f'num_samples repeats one condition; got {rows}')
  return n


def guidance(cfg_scale, uncond_tokens, cond_shape, vocab_size):
  """cfg_scale needs uncond_tokens of the conditions' shape; returns whether it guides."""
  if cfg_scale is None:
    return False
  if uncond_tokens is None:
    raise ValueError('cfg_scale needs uncond_tokens')
  tokens(uncond_tokens, 'uncond_tokens', vocab_size)
  if tuple(np.shape(uncond_tokens)) != tuple(cond_shape):
    raise ValueError(
      f'uncond_tokens {tuple(np.shape(uncond_tokens))} must match cond_tokens {tuple(cond_shape)}'
    )
  return True


def grid(value):
  """(h, w) of a code grid: two positive ints."""
  if len(value) != 2 or not all(_is_number(n) and float(n).is_integer() and n > 0 for n in value):
    raise ValueError(f'grid must be (h, w) of positive ints, got {value!r}')
  return tuple(int(n) for n in value)


def window(grid_h, grid_w, size):
  """taming's sliding window: an even side >= 2, no larger than the grid."""
  if size % 2 or size < 2:
    raise ValueError(f'window must be even and >= 2 (taming uses 16), got {size}')
  if grid_h < size or grid_w < size:
    raise ValueError(f'grid {grid_h}x{grid_w} smaller than the window {size}')


def decoding_iterations(iterations, schedule, choice_temperature, schedules):
  """MaskGIT's decoding arguments: iterations an int >= 1, a known schedule, and a
  choice_temperature >= 0 (unchecked when traced)."""
  if not (_is_number(iterations) and isinstance(iterations, (int, np.integer)) and iterations >= 1):
    raise ValueError(f'iterations must be an integer >= 1 (MaskGIT uses 8-12), got {iterations!r}')
  if schedule not in schedules:
    raise ValueError(f'schedule must be one of {schedules}, got {schedule!r}')
  nonnegative(choice_temperature, 'choice_temperature')


# ----------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------


def devices_of(tree):
  """The local devices the arrays of `tree` live on (a jitted call on them runs there). Under
  a caller's own jit the arrays are tracers, without a placement: the first local device."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
      return sorted(leaf.sharding.addressable_devices, key=lambda d: d.id)
  return jax.local_devices()[:1]


def host_free_bytes():
  """The host's available memory (MemAvailable where /proc/meminfo has it)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


def free_bytes(devices):
  """(bytes free for one copy of a replicated batch on `devices`, where, in words): the least
  free device memory (bytes_limit - bytes_in_use) on accelerators; on CPU, the host's
  available memory shared by its devices, each of which holds a copy."""
  stats = [d.memory_stats() for d in devices]
  if all(s and 'bytes_limit' in s for s in stats):
    free = min(s['bytes_limit'] - s.get('bytes_in_use', 0) for s in stats)
    return free, f'{devices[0].device_kind} device'
  n = max(1, sum(d.platform == 'cpu' for d in devices))
  return host_free_bytes() // n, 'host' if n == 1 else f'host (for each of {n} CPU devices)'


def _gb(n):
  return f'{n / 1e9:.3g} GB'


def fits(per_item, n, what, devices=None, *, needs='', hint='sample in batches of at most'):
  """Refuses a batch of `n` items of about `per_item` peak bytes each that would not fit in
  what `devices` (None: the host) have free, naming `what` (e.g. 'num_samples=1000000') and
  the largest batch that fits."""
  free, where = (host_free_bytes(), 'host') if devices is None else free_bytes(devices)
  need = per_item * n
  if need <= free:
    return
  most = max(0, free // max(1, per_item))
  fix = f'{hint} {most}' if most else 'even one does not fit'
  raise ValueError(
    f'{what} needs about {_gb(need)}{needs}, more than the {where} has free '
    f'({_gb(max(0, free))}); {fix}'
  )


def nbytes(*shape, itemsize=4):
  return math.prod(int(s) for s in shape) * itemsize
