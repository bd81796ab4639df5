"""Stage-2 sampling: logit filtering, a KV-cached sampler and taming's sliding window.

Randomness: the token at raster index t (0-based, counting sampled tokens only; for a grid
t = i * grid_w + j) is drawn with `jax.random.fold_in(rng, t)`, shared by the whole batch
(one categorical draw per row). Both samplers use this rule, so a sliding window whose grid
equals the window reproduces `sample` for the same key, and a key always gives the same tokens.

Classifier-free guidance (an addition; the original has none): the conditional and the
unconditional batch run as one batch of 2B through the same cache, and the logits fed to the
filter are `uncond + cfg_scale * (cond - uncond)`. Both batches are continued with the same
(guided) tokens.

Arguments: `temperature` 0 is greedy decoding (argmax of the filtered logits), as a traced
value too, so one compile serves greedy and sampled calls. Bad arguments (a negative
temperature, top_k < 0, top_p outside (0, 1], a sequence longer than the model's block size)
raise one ValueError naming the argument before anything runs (`checks.sampling_filters`), as do
condition tokens outside the vocabulary and a batch whose estimated peak memory (`gpt_bytes`,
`decode_bytes`) exceeds what its devices have free (`checks.fits`).
"""

import dataclasses
import functools
from typing import Any
from typing import Mapping

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import checks
from vqgan_jax.models import transformer as tf

# Cache slots added per decode loop of `sample` (see there): smaller reads less of the cache
# per step, larger compiles fewer loops (256 steps: 4).
CACHE_SEGMENT = 64


def filter_logits(logits, temperature=1.0, top_k=None, top_p=1.0):
  """taming's filtering: `logits / temperature`, then top-k, then top-p; removed -> -inf.

  top-k keeps every logit >= the k-th largest (ties at the k-th value survive). top-p follows
  HF transformers 4.3.1 `top_k_top_p_filtering`: sort descending, cumulative softmax, remove
  tokens whose cumulative probability exceeds p, shifted right by one so the token that
  crosses p is kept (the most likely token is always kept). top_k None/0 and top_p 1.0 (or
  None) disable. top_k must be a Python int; top_p a Python float to be skipped at 1.0.
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = kth_largest(logits, min(int(top_k), logits.shape[-1]))
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and not (isinstance(top_p, (int, float)) and top_p >= 1.0):
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove = cum > top_p
    remove = jnp.concatenate([jnp.zeros_like(remove[..., :1]), remove[..., :-1]], axis=-1)
    remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def kth_largest(x, k):
  """The k-th largest float32 value along the last axis (kept as a size-1 axis), exactly.

  Equal to `lax.top_k(x, k)[0][..., -1:]` (ties counted), without the sort that `top_k`
  lowers to on CPU (40-66 us vs 260-380 us per call at 8 x 513, top-k 100, in a ~9 ms
  sampling step): the answer is the largest v with count(x >= v) >= k, built bit by bit from
  the top on the order-preserving uint32 image of the floats, one fused count per bit (base
  4 and 16 digits measured slower).
  """
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  key = jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))
  ans = jnp.zeros(x.shape[:-1] + (1,), jnp.uint32)
  for shift in range(31, -1, -1):
    cand = ans | jnp.uint32(1 << shift)
    ans = jnp.where(jnp.sum(key >= cand, axis=-1, keepdims=True) >= k, cand, ans)
  bits = jnp.where((ans >> 31) == 1, ans & jnp.uint32(0x7FFFFFFF), ~ans)
  return lax.bitcast_convert_type(bits, jnp.float32)


# ----------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------


def decoding_variables(model, params):
  """The per-layer model and {'params': ...} variables a decode loop runs on (both samplers)."""
  if isinstance(params, Mapping) and 'params' in params:
    params = params['params']
  if model.scan_layers or 'blocks' in params:
    params = tf.unstack_layers(params)
    model = model.clone(scan_layers=False)
  if jnp.dtype(model.dtype) != jnp.float32:
    # Kernels in the compute dtype once, before the decode loop: a step streams every kernel,
    # and casting float32 kernels inside the loop would read them at full width every step.
    params = jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(model.dtype) if path[-1].key == 'kernel' else x, params
    )
  return model, {'params': params}


def check_sampling_args(
  model, *, cond_len, image_len, length_arg, temperature=1.0, top_k=None, top_p=1.0
):
  """Refuses arguments that would sample garbage silently; returns (top_k, top_p) normalised.

  `length_arg` names the argument that set `image_len` (steps, grid, window) for the block
  size message. A temperature traced by the caller's own jit cannot be checked here.
  """
  top_k, top_p = checks.sampling_filters(temperature, top_k, top_p)
  checks.sequence_fits(model.block_size, cond_len, image_len, length_arg)
  return top_k, top_p


def check_tokens(model, tokens, name):
  """(batch, length) tokens, a non-empty batch of ids in [0, model.vocab_size); returns the
  length (traced tokens: only the shape is checked)."""
  return checks.tokens(tokens, name, model.vocab_size)


def gpt_bytes(model, *, cond_len, grid, window=None, cond_is_grid=False, guided=False):
  """The KV-cached samplers' estimated peak bytes per sample of a (h, w) code grid (with a
  sliding `window`: its window): the float32 K/V cache, the longest forward (the prefill, or
  a window's re-encoding: activations and attention scores), a few copies of the logits
  while filtering, and the drawn tokens. Guidance doubles the batch."""
  h, w = grid
  if window is None:
    prefill, slots = cond_len, cond_len + h * w - 1
  else:
    lc = window * window if cond_is_grid else cond_len
    prefill, slots = lc + (window - 1) * window + window // 2, lc + window * window - 1
  cache = checks.nbytes(model.n_layer, 2, slots, model.n_embd)
  forward = checks.nbytes(8, prefill, model.n_embd) + checks.nbytes(2, model.n_head, prefill, slots)
  logits = checks.nbytes(8, model.vocab_size)
  return (cache + forward + logits) * (2 if guided else 1) + checks.nbytes(h, w)


def decode_bytes(vqgan, grid):
  """The decoder's estimated peak bytes per image of a (h, w) code grid: a few activations
  of its widest level, the attention scores where it attends, and the float32 image."""
  f = 2 ** (len(vqgan.ch_mult) - 1)
  h, w = grid[0] * f, grid[1] * f
  peak = 0
  for i, mult in enumerate(vqgan.ch_mult):
    rh, rw = h >> i, w >> i
    level = checks.nbytes(4, rh, rw, vqgan.ch * mult)
    if rh in vqgan.attn_resolutions:
      level += checks.nbytes(2, rh * rw, rh * rw)
    peak = max(peak, level)
  return peak + checks.nbytes(h, w, vqgan.out_ch)


def guide(logits, cfg_scale):
  """Classifier-free guidance: a (2B, V) batch [cond; uncond] -> uncond + s * (cond - uncond)."""
  c, u = jnp.split(logits, 2, axis=0)
  return u + cfg_scale * (c - u)


def _with_uncond(cond, uncond, guided):
  return jnp.concatenate([cond, uncond], axis=0) if guided else cond


class _Stepper:
  """Runs the model on the (possibly doubled) batch and draws guided, filtered tokens."""

  def __init__(self, model, variables, rng, temperature, cfg_scale, guided, top_k, top_p):
    self.model, self.variables, self.rng = model, variables, rng
    self.temperature, self.cfg_scale, self.guided = temperature, cfg_scale, guided
    self.top_k, self.top_p = top_k, top_p

  def logits(self, tokens, cache, pos, logits_at):
    """tokens (B, T) for the conditional batch; returns guided logits (B, V) at logits_at."""
    if self.guided:
      tokens = jnp.concatenate([tokens, tokens], axis=0)
    logits, cache = self.model.apply(
      self.variables, tokens, cache, pos, logits_at, method=self.model.decode
    )
    if self.guided:
      logits = guide(logits, self.cfg_scale)
    return logits, cache

  def draw(self, logits, t):
    # temperature is traced: greedy is a select, not a recompile. Filtering the unscaled
    # logits keeps the argmax, and temperature 1 there keeps the division finite.
    greedy = self.temperature == 0
    logits = filter_logits(logits, jnp.where(greedy, 1.0, self.temperature), self.top_k, self.top_p)
    drawn = jax.random.categorical(jax.random.fold_in(self.rng, t), logits, axis=-1)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


# ----------------------------------------------------------------------------------------
# Checked arguments: each public sampler checks its arguments once, then runs an unchecked
# core that the other entry points (`sample_images`, `inference`) call with theirs.
# ----------------------------------------------------------------------------------------


def check_memory(
  per_sample, cond_tokens, params, what=None, n=None, needs=' for the KV cache and logits'
):
  """Refuses a batch of cond_tokens (or of `n` samples) whose sampling would not fit the
  devices of `params`."""
  n = np.shape(cond_tokens)[0] if n is None else n
  where = checks.devices_of(params)
  checks.fits(per_sample, n, what or f'a batch of {n} samples', where, needs=needs)


def check_condition(model, condition, num_samples):
  """(Lc, the number of samples) of a sampler's `condition` ((B, Lc) or one (Lc,) token ids
  in [0, vocab_size)) and `num_samples` (a positive int repeating a single condition)."""
  return checks.condition(condition, num_samples, model.vocab_size)


def check_images_memory(params, condition, per_sample, vqgan, grid, num_samples, n):
  """`check_memory` of a `sample_images` call: the sampler or the decoder, whichever needs
  more per sample."""
  what = None if num_samples is None else f'num_samples={n}'
  need = max(per_sample, decode_bytes(vqgan, grid))
  check_memory(need, condition, params['gpt'], what, n, needs=' for the sampler and the decoder')


@dataclasses.dataclass(frozen=True)
class Filters:
  """Checked filter and guidance arguments, as the unchecked cores take them."""

  temperature: Any = 1.0
  top_k: int | None = None
  top_p: float = 1.0
  cfg_scale: float | None = None

  @property
  def guided(self):
    return self.cfg_scale is not None

  def loop_args(self, params, model, cond, uncond, rng):
    """The positional arguments of the jitted loops: (variables, decoding model, int32
    cond, int32 uncond or None, rng, traced temperature, traced cfg_scale)."""
    model, variables = decoding_variables(model, params)
    cond = jnp.asarray(cond, jnp.int32)
    uncond = jnp.asarray(uncond, jnp.int32) if self.guided else None
    scale = jnp.float32(self.cfg_scale if self.guided else 0.0)
    return variables, model, cond, uncond, rng, jnp.float32(self.temperature), scale


def check_filters(
  model, cond_tokens, *, cond_len, image_len, length_arg, temperature, top_k, top_p, cfg_scale,
  uncond_tokens,
):  # fmt: skip
  """`check_sampling_args` and the guidance's tokens; returns the checked `Filters`."""
  top_k, top_p = check_sampling_args(
    model,
    cond_len=cond_len,
    image_len=image_len,
    length_arg=length_arg,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )
  checks.guidance(cfg_scale, uncond_tokens, np.shape(cond_tokens), model.vocab_size)
  return Filters(temperature, top_k, top_p, cfg_scale)


# ----------------------------------------------------------------------------------------
# Plain (KV-cached) sampler
# ----------------------------------------------------------------------------------------


def sample(
  params,
  model,
  cond_tokens,
  rng,
  *,
  steps,
  temperature=1.0,
  top_k=None,
  top_p=1.0,
  cfg_scale=None,
  uncond_tokens=None,
  cache_segment=CACHE_SEGMENT,
):
  """Samples `steps` tokens after the conditioning tokens (B, Lc); returns (B, steps) int32.

  The conditioning (SOS token, class id, or a cond-stage code sequence) is prefilled into a
  preallocated K/V cache in one forward, then one token per step inside a `lax.fori_loop`.
  Compiled once per (model, shapes, steps, top_k, top_p, guidance on/off); temperature and
  cfg_scale are traced; temperature 0 is greedy (argmax). `params` may be either layout
  ({'params': ...} or the bare tree).

  The cache grows in `cache_segment`-slot steps (one decode loop per size, each compiled):
  a step reads every slot of the cache it runs on, so a cache sized for the whole sequence
  would be read in full from the first token on. Tokens do not depend on the segment size.
  """
  cond_len = check_tokens(model, cond_tokens, 'cond_tokens')
  filters = check_filters(
    model,
    cond_tokens,
    cond_len=cond_len,
    image_len=steps,
    length_arg=f'steps={steps}',
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    cfg_scale=cfg_scale,
    uncond_tokens=uncond_tokens,
  )
  need = gpt_bytes(model, cond_len=cond_len, grid=(1, steps), guided=filters.guided)
  check_memory(need, cond_tokens, params)
  return _sample_tokens(
    params, model, cond_tokens, uncond_tokens, rng, filters, steps, cache_segment
  )


def _sample_tokens(params, model, cond, uncond, rng, filters, steps, cache_segment=CACHE_SEGMENT):
  """`sample` on checked arguments."""
  return _sample(
    *filters.loop_args(params, model, cond, uncond, rng),
    steps=int(steps),
    top_k=filters.top_k,
    top_p=filters.top_p,
    guided=filters.guided,
    cache_segment=max(1, int(cache_segment)),
  )


def _grow(cache, length):
  """The cache with its length axis zero-padded to `length` slots."""

  def pad(x):
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))

  return jax.tree.map(pad, cache)


@functools.partial(
  jax.jit, static_argnames=('model', 'steps', 'top_k', 'top_p', 'guided', 'cache_segment')
)
def _sample(
  variables,
  model,
  cond,
  uncond,
  rng,
  temperature,
  cfg_scale,
  *,
  steps,
  top_k,
  top_p,
  guided,
  cache_segment,
):
  b, lc = cond.shape
  st = _Stepper(model, variables, rng, temperature, cfg_scale, guided, top_k, top_p)
  # Step t (1 <= t < steps) writes slot lc + t - 1 and reads slots [0, lc + t): the cache
  # needs lc + steps - 1 slots in all (the last token is never fed back), and a loop over
  # steps [t0, t1) can run on the first lc + t1 - 1 of them.
  total = lc + steps - 1
  sizes = sorted(
    {min(total, -(-(lc + t) // cache_segment) * cache_segment) for t in range(1, steps)} | {total}
  )
  cache = model.init_cache(b * (2 if guided else 1), sizes[0])
  if guided:
    # Prefill differs per half (cond vs uncond); afterwards both halves get the same tokens.
    logits, cache = model.apply(
      variables, _with_uncond(cond, uncond, True), cache, 0, lc - 1, method=model.decode
    )
    logits = guide(logits, cfg_scale)
  else:
    logits, cache = st.logits(cond, cache, 0, lc - 1)
  first = st.draw(logits, 0)
  out = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(first)

  def body(t, carry):
    out, prev, cache = carry
    logits, cache = st.logits(prev[:, None], cache, lc + t - 1, 0)
    tok = st.draw(logits, t)
    out = lax.dynamic_update_slice(out, tok[:, None], (0, t))
    return out, tok, cache

  carry, t0 = (out, first, cache), 1
  for size in sizes:
    t1 = min(steps, size - lc + 1)
    if t1 > t0:
      carry = (carry[0], carry[1], _grow(carry[2], size))
      carry = lax.fori_loop(t0, t1, body, carry)
      t0 = t1
  return carry[0]


@functools.partial(jax.jit, static_argnums=0)
def decode_codes(vqgan, vqgan_params, codes):
  """(N, h, w) code grids -> (N, H, W, C) float32 images (nominally [-1, 1]) by the decoder."""
  return vqgan.apply({'params': vqgan_params}, codes, method='decode_indices')


def repeat_condition(condition, num_samples, uncond_tokens):
  """(B, Lc) int32 conditions (a single (Lc,) one made (1, Lc)), and the guidance's
  unconditional tokens, repeated num_samples times when num_samples is given."""
  condition = jnp.asarray(condition, jnp.int32)
  if condition.ndim == 1:
    condition = condition[None]
  if num_samples is not None:  # checked: one condition (`checks.repeats`)
    condition = jnp.repeat(condition, num_samples, axis=0)
    if uncond_tokens is not None:
      uncond_tokens = jnp.repeat(
        jnp.asarray(uncond_tokens, jnp.int32).reshape(1, -1), num_samples, axis=0
      )
  return condition, uncond_tokens


def sample_images(
  params,
  model,
  vqgan,
  condition,
  rng,
  *,
  grid,
  num_samples=None,
  temperature=1.0,
  top_k=None,
  top_p=1.0,
  cfg_scale=None,
  uncond_tokens=None,
  window=None,
):
  """Samples code grids and decodes them: returns (tokens (N, h, w) int32, images (N, H, W, C)
  float32, the decoder's output: nominally [-1, 1], unclipped).

  params: {'gpt': GPT params (either layout), 'vqgan': stage-1 VQGAN params}.
  condition: (B, Lc) conditioning tokens (see `sample`); with `num_samples`, a single
    condition ((Lc,) or (1, Lc)) is repeated num_samples times.
  grid: (h, w) of the code grid; larger than the training grid it needs `window` (the
    training grid's side), and then runs `sliding_window_sample` with a constant prefix.
  temperature 0 is greedy (argmax); the arguments are checked as in `sample` before anything
  runs. Both samplers and the decoder are jitted (compiled once per shape and filter settings).
  """
  cond_len, num = check_condition(model, condition, num_samples)
  grid = checks.grid(grid)
  condition, uncond_tokens = repeat_condition(condition, num_samples, uncond_tokens)
  filters = check_image_args(
    model,
    condition,
    grid=grid,
    window=window,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    cfg_scale=cfg_scale,
    uncond_tokens=uncond_tokens,
  )
  need = gpt_bytes(model, cond_len=cond_len, grid=grid, window=window, guided=filters.guided)
  check_images_memory(params, condition, need, vqgan, grid, num_samples, num)
  return images_of(params, model, vqgan, condition, uncond_tokens, rng, filters, grid, window)


def check_image_args(model, condition, *, grid, window, uncond_tokens, **filters):
  """`sample_images`'s checks of (B, Lc) conditions on a checked (h, w) grid: the window
  (None: none), the filters and guidance; returns the checked `Filters`."""
  h, w = grid
  if window is None:
    image_len, length_arg = h * w, f'grid={grid}'
  else:
    checks.window(h, w, window)
    image_len, length_arg = window * window, f'window={window}'
  return check_filters(
    model,
    condition,
    cond_len=np.shape(condition)[1],
    image_len=image_len,
    length_arg=length_arg,
    uncond_tokens=uncond_tokens,
    **filters,
  )


def images_of(params, model, vqgan, condition, uncond, rng, filters, grid, window=None):
  """`sample_images` on checked (B, Lc) conditions (already repeated) and arguments."""
  h, w = grid
  if window is None:
    tokens = _sample_tokens(params['gpt'], model, condition, uncond, rng, filters, h * w)
    tokens = tokens.reshape(-1, h, w)
  else:
    tokens = _sliding_tokens(params['gpt'], model, condition, uncond, rng, filters, grid, window)
  return tokens, decode_codes(vqgan, params['vqgan'], tokens)


# ----------------------------------------------------------------------------------------
# Sliding window (taming-spec f.3)
# ----------------------------------------------------------------------------------------


def window_offset(i, size, window):
  """taming's local index of grid row/column i in a window of `window` over `size`."""
  half = window // 2
  return jnp.where(i <= half, i, jnp.where(size - i < half, window - (size - i), half))


def sliding_window_sample(
  params,
  model,
  cond_tokens,
  rng,
  *,
  grid_h,
  grid_w,
  window=16,
  temperature=1.0,
  top_k=None,
  top_p=1.0,
  cfg_scale=None,
  uncond_tokens=None,
  cond_is_grid=None,
):
  """Samples a (B, grid_h, grid_w) code grid larger than the training crop, as taming does.

  For each position (i, j) in raster order the window (window x window tokens) is placed by
  taming's rule (local index li = i if i <= half, window - (grid_h - i) near the far edge,
  half otherwise; the same for columns), the model sees the window's cond tokens followed by
  its image tokens in window-raster order, and the token at (li, lj) is sampled.

  cond_tokens: (B, grid_h * grid_w) cond-stage codes of a grid the same size as the image
  grid (the window's part is cut out at each step), or a constant (B, Lc) prefix such as the
  SOS token / class id (Lc = 1) of unconditional / class-conditional models. `cond_is_grid`
  defaults to `Lc == grid_h * grid_w`.

  Exactness and cost: positions after (li, lj) in the window are causally masked, so only
  finished tokens matter. While the window does not move (j <= half, and j >= grid_w - half
  where it rests at the right edge) each step appends one token, so a K/V cache is prefilled
  once and extended one token per step. Where it slides every position in it changes, so
  the window's prefix is re-encoded, truncated to the length that position needs (two static
  lengths: li <= half and li > half). All images run as one batch. temperature 0 is greedy
  (argmax); the arguments are checked as in `sample` before anything runs.
  """
  checks.window(grid_h, grid_w, window)
  cond_len = check_tokens(model, cond_tokens, 'cond_tokens')
  if cond_is_grid is None:
    cond_is_grid = cond_len == grid_h * grid_w
  filters = check_filters(
    model,
    cond_tokens,
    cond_len=window * window if cond_is_grid else cond_len,
    image_len=window * window,
    length_arg=f'window={window}',
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    cfg_scale=cfg_scale,
    uncond_tokens=uncond_tokens,
  )
  grid = (grid_h, grid_w)
  need = gpt_bytes(
    model,
    cond_len=cond_len,
    grid=grid,
    window=window,
    cond_is_grid=cond_is_grid,
    guided=filters.guided,
  )
  check_memory(need, cond_tokens, params)
  return _sliding_tokens(
    params, model, cond_tokens, uncond_tokens, rng, filters, grid, window, bool(cond_is_grid)
  )


def _sliding_tokens(params, model, cond, uncond, rng, filters, grid, window, cond_is_grid=False):
  """`sliding_window_sample` on checked arguments."""
  return _sliding(
    *filters.loop_args(params, model, cond, uncond, rng),
    h=grid[0],
    w=grid[1],
    win=window,
    is_grid=cond_is_grid,
    top_k=filters.top_k,
    top_p=filters.top_p,
    guided=filters.guided,
  )


@functools.partial(
  jax.jit, static_argnames=('model', 'h', 'w', 'win', 'is_grid', 'top_k', 'top_p', 'guided')
)
def _sliding(
  variables,
  model,
  cond,
  uncond,
  rng,
  temperature,
  cfg_scale,
  *,
  h,
  w,
  win,
  is_grid,
  top_k,
  top_p,
  guided,
):
  cond_all = _with_uncond(cond, uncond, guided)
  if is_grid:
    cond_all = cond_all.reshape(cond_all.shape[0], h, w)
  st = _Stepper(model, variables, rng, temperature, cfg_scale, guided, top_k, top_p)
  sw = _SlidingWindow(st, cond_all, cond.shape[0], h, w, win, is_grid)
  grid = jnp.zeros((sw.b, h, w), jnp.int32)
  cache = model.init_cache(cond_all.shape[0], sw.lc + win * win - 1)
  grid, _ = lax.fori_loop(0, h, sw.row, (grid, cache))
  return grid


class _SlidingWindow:
  """The traced pieces of `_sliding`: a (B, h, w) grid sampled row by row, the window
  re-encoded where it slides and its cache extended where it rests."""

  def __init__(self, st, cond_all, b, h, w, win, is_grid):
    self.st, self.cond_all, self.b, self.h, self.w = st, cond_all, b, h, w
    self.win, self.half, self.is_grid = win, win // 2, is_grid
    self.lc = win * win if is_grid else cond_all.shape[1]
    # Longest prefix a re-encode needs: up to (li, half) inclusive of what precedes it.
    self.short_len = self.lc + self.half * win + self.half  # li <= half
    self.full_len = self.lc + (win - 1) * win + self.half  # li > half (last rows of the grid)

  def decode(self, tokens, cache, pos, logits_at):
    """The model on the (guidance-doubled) tokens at logits_at; guided logits."""
    st = self.st
    logits, cache = st.model.apply(
      st.variables, tokens, cache, pos, logits_at, method=st.model.decode
    )
    return self.guided(logits), cache

  def guided(self, logits):
    return guide(logits, self.st.cfg_scale) if self.st.guided else logits

  def prefill(self, grid, cache, r0, c0, li, lj):
    """Encodes the window at (r0, c0) into the cache; guided logits for (li, lj)."""
    b, bb, win = self.b, self.cond_all.shape[0], self.win
    img = lax.dynamic_slice(grid, (0, r0, c0), (b, win, win)).reshape(b, win * win)
    img = _with_uncond(img, img, self.st.guided)
    cw = self.cond_all
    if self.is_grid:
      cw = lax.dynamic_slice(cw, (0, r0, c0), (bb, win, win)).reshape(bb, win * win)
    seq = jnp.concatenate([cw, img], axis=1)
    at = self.lc - 1 + li * win + lj

    def run(n):
      model = self.st.model
      return lambda c: model.apply(self.st.variables, seq[:, :n], c, 0, at, method=model.decode)

    if self.short_len == self.full_len:
      logits, cache = run(self.full_len)(cache)
    else:
      logits, cache = lax.cond(li <= self.half, run(self.short_len), run(self.full_len), cache)
    return self.guided(logits), cache

  @staticmethod
  def put(grid, i, j, tok):
    return lax.dynamic_update_slice(grid, tok[:, None, None], (0, i, j))

  def extend(self, grid, cache, i, li, c0, j0, j1):
    """Samples columns [j0, j1) of row i with the window fixed at column c0."""

    def body(j, carry):
      grid, cache = carry
      prev = lax.dynamic_slice(grid, (0, i, j - 1), (self.b, 1, 1)).reshape(self.b, 1)
      prev = _with_uncond(prev, prev, self.st.guided)
      pos = self.lc + li * self.win + (j - 1 - c0)
      logits, cache = self.decode(prev, cache, pos, 0)
      return self.put(grid, i, j, self.st.draw(logits, i * self.w + j)), cache

    return lax.fori_loop(j0, j1, body, (grid, cache))

  def row(self, i, carry):
    """Samples row i: the window rests at the left, slides, then rests at the right edge."""
    grid, cache = carry
    w, win, half = self.w, self.win, self.half
    li = window_offset(i, self.h, win)
    r0 = i - li
    logits, cache = self.prefill(grid, cache, r0, 0, li, 0)
    grid = self.put(grid, i, 0, self.st.draw(logits, i * w))
    if w == win:  # the window never moves along the row
      return self.extend(grid, cache, i, li, 0, 1, w)
    grid, cache = self.extend(grid, cache, i, li, 0, 1, half + 1)

    def slide(j, carry):
      grid, cache = carry
      logits, cache = self.prefill(grid, cache, r0, j - half, li, half)
      return self.put(grid, i, j, self.st.draw(logits, i * w + j)), cache

    # The last sliding position already has the window at the right edge (c0 = w - win);
    # its cache then serves the rest of the row.
    grid, cache = lax.fori_loop(half + 1, w - half + 1, slide, (grid, cache))
    return self.extend(grid, cache, i, li, w - win, w - half + 1, w)
