"""MaskGIT's parallel decoding (google-research/maskgit `libml/parallel_decode.py`): a whole
code grid in T decoding iterations (`iterations`; the GPT sampler's `steps` count its tokens)
instead of one step per code.

Start with every code masked. At step t (0-based) of T:
  1. one forward of the bidirectional transformer over [condition | current codes];
  2. draw a code at every position (temperature, top-k, top-p: `sampling.filter_logits`);
     positions already decoded keep theirs. With `final_temperature` the draws' temperature
     moves linearly from `temperature` at step 0 to it at step T - 1;
  3. confidence = a score + choice_temperature * (1 - (t + 1) / T) * Gumbel noise; decoded
     positions get +inf. The score (`confidence`): 'sampled', MaskGIT's, log p of the drawn
     code (under the distribution it was drawn from); 'max', the largest log p at the
     position, which does not depend on the draw;
  4. re-mask the `mask_counts(N, T, schedule)[t]` least confident positions: floor(N gamma((t+1)/T))
     with gamma the schedule, at least 1 and fewer than the codes still unknown, and 0 at the
     last step, so the grid is complete after T steps and a decoded code never changes.
The counts are static (computed on the host), so the loop is a `lax.fori_loop` of static
shapes, compiled once per (model, batch, T, schedule, filters, guidance on/off); the
temperatures and cfg_scale are traced.

Randomness: step t draws with `fold_in(rng, t)` (split into the draw and the noise keys), so a
key always gives the same codes. Classifier-free guidance: the conditional and unconditional
batches run as one batch of 2B and the logits are `uncond + cfg_scale * (cond - uncond)`, as in
`sampling.py`. temperature 0 draws the argmax (the confidence is then that of the filtered
softmax at temperature 1).
"""

import dataclasses
import functools
import math
from typing import Any
import warnings

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import checks
from vqgan_jax import sampling
from vqgan_jax.models import maskgit as maskgit_lib

# MaskGIT's default scale of the Gumbel noise on the confidence (annealed to 0).
CHOICE_TEMPERATURE = 4.5
# MaskGIT's default number of decoding iterations T (its paper: 8-12).
ITERATIONS = 8
# What ranks the drawn codes (step 3 above). MaskGIT's 'sampled' keeps the draws that came out
# likely, so a kept code is biased towards its distribution's modes: its samples are less
# varied than the model (on the Fashion-MNIST demo, fd_fmnist 12.0 against 6.8 for 'max' at
# T = 8, guidance 2; README "Guidance"). 'max' chooses the positions by how sure the model is
# there, before looking at the draw, so each kept code is a plain draw from its conditional.
CONFIDENCES = ('sampled', 'max')
# The decoding keywords beside the filters (config.sample's defaults in TrainedTransformer).
DECODING_ARGS = ('iterations', 'schedule', 'choice_temperature', 'confidence', 'final_temperature')


def mask_counts(n: int, iterations: int, schedule: str = 'cosine'):
  """The number of codes still masked after each of the `iterations` steps, for n codes."""
  counts, unknown = [], n
  for t in range(iterations):
    if t == iterations - 1:
      k = 0
    else:
      k = math.floor(n * float(maskgit_lib.mask_ratio((t + 1) / iterations, schedule, np)))
      k = max(1, min(unknown - 1, k))
    counts.append(k)
    unknown = k
  return tuple(counts)


def renamed_steps(iterations, steps, default=None):
  """`iterations`, or the deprecated `steps` keyword that meant it (MaskGIT's decoding
  iterations; `steps` is the GPT sampler's number of tokens)."""
  if steps is None:
    return default if iterations is None else iterations
  warnings.warn(
    "MaskGIT's `steps` is now `iterations` (its decoding iterations)",
    DeprecationWarning,
    stacklevel=3,
  )
  if iterations is not None:
    raise ValueError('pass iterations, not also its old name steps')
  return steps


@dataclasses.dataclass(frozen=True)
class Decoding:
  """Checked decoding arguments: MaskGIT's iterations, schedule and choice_temperature."""

  iterations: int = ITERATIONS
  schedule: str = 'cosine'
  choice_temperature: Any = CHOICE_TEMPERATURE
  confidence: str = 'sampled'
  final_temperature: Any = None  # None: the filters' temperature at every step


def check_args(
  model,
  condition,
  *,
  iterations,
  schedule,
  choice_temperature,
  confidence='sampled',
  final_temperature=None,
  cfg_scale=None,
  uncond_tokens=None,
  **filters,
):
  """Refuses bad arguments for (B, Lc) conditions with one ValueError before anything
  compiles; returns (`Decoding`, `sampling.Filters`) checked."""
  checks.decoding_iterations(iterations, schedule, choice_temperature, maskgit_lib.SCHEDULES)
  if confidence not in CONFIDENCES:
    raise ValueError(f'confidence must be one of {CONFIDENCES}, got {confidence!r}')
  if final_temperature is not None:
    checks.nonnegative(final_temperature, 'final_temperature', ' (or None)')
  cond_len = np.shape(condition)[1]
  n = model.block_size - cond_len
  if n < 1:
    raise ValueError(
      f'{cond_len} condition tokens leave no codes to sample in block_size {model.block_size}'
    )
  checked = sampling.check_filters(
    model,
    condition,
    cond_len=cond_len,
    image_len=n,
    length_arg=f'{n} codes',
    cfg_scale=cfg_scale,
    uncond_tokens=uncond_tokens,
    **filters,
  )
  decoding = Decoding(int(iterations), schedule, choice_temperature, confidence, final_temperature)
  return decoding, checked


def maskgit_bytes(model, cond_len, guided=False):
  """The sampler's estimated peak bytes per sample: one full forward over the block
  (activations and attention scores) and a few copies of the logits at every code while
  filtering, drawing and ranking. Guidance doubles the forward's batch."""
  seq, n = model.block_size, model.block_size - cond_len
  forward = checks.nbytes(8, seq, model.n_embd) + checks.nbytes(2, model.n_head, seq, seq)
  return forward * (2 if guided else 1) + checks.nbytes(8, n, model.vocab_size)


def sample(
  params,
  model,
  cond_tokens,
  rng,
  *,
  iterations=None,
  schedule='cosine',
  temperature=1.0,
  top_k=None,
  top_p=1.0,
  choice_temperature=CHOICE_TEMPERATURE,
  confidence='sampled',
  final_temperature=None,
  cfg_scale=None,
  uncond_tokens=None,
  return_history=False,
  steps=None,
  known=None,
):
  """Decodes the N = block_size - Lc codes after the condition (B, Lc) in `iterations`
  parallel steps (default 8); returns (B, N) int32 (and with return_history the codes after
  every iteration, (B, iterations, N), the [MASK] id where still masked).

  model: a `MaskGIT` (either parameter layout). schedule: 'cosine' (MaskGIT's), 'linear' or
  'square'. confidence: what ranks the draws ('sampled': MaskGIT's; 'max': CONFIDENCES).
  final_temperature: the draws' temperature at the last step, reached linearly from
  `temperature` at the first (None: `temperature` throughout).
  cfg_scale (with uncond_tokens, e.g. the null class): classifier-free guidance.
  steps: the deprecated name of iterations. known: (codes (B, N), keep (N,) host bools) for
  completion (`completion.py`): the kept codes start decoded, so they are never re-masked or
  changed, and the schedule counts only the unknown ones (at least one).
  """
  iterations = renamed_steps(iterations, steps, ITERATIONS)
  cond_len = sampling.check_tokens(model, cond_tokens, 'cond_tokens')
  decoding, filters = check_args(
    model,
    cond_tokens,
    iterations=iterations,
    schedule=schedule,
    choice_temperature=choice_temperature,
    confidence=confidence,
    final_temperature=final_temperature,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    cfg_scale=cfg_scale,
    uncond_tokens=uncond_tokens,
  )
  sampling.check_memory(maskgit_bytes(model, cond_len, filters.guided), cond_tokens, params)
  out = _decode(
    params, model, cond_tokens, uncond_tokens, rng, filters, decoding, return_history, known
  )
  return out if return_history else out[0]


def _decode(params, model, cond, uncond, rng, filters, decoding, history=False, known=None):
  """`sample` on checked arguments: (codes, history)."""
  n, init = model.block_size - np.shape(cond)[1], None
  if known is not None:
    keep = np.asarray(known[1], bool).reshape(-1)
    init = jnp.where(keep, jnp.asarray(known[0], jnp.int32), model.mask_id)
    n = int((~keep).sum())
  variables, model, cond, uncond, rng, temperature, cfg_scale = filters.loop_args(
    params, model, cond, uncond, rng
  )
  final = temperature if decoding.final_temperature is None else decoding.final_temperature
  return _sample(
    variables,
    model,
    cond,
    uncond,
    rng,
    temperature,
    jnp.float32(final),
    jnp.float32(decoding.choice_temperature),
    cfg_scale,
    init,
    counts=mask_counts(n, decoding.iterations, decoding.schedule),
    confidence=decoding.confidence,
    top_k=filters.top_k,
    top_p=filters.top_p,
    guided=filters.guided,
    history=bool(history),
  )


def step_temperature(temperature, final_temperature, t, iterations):
  """The draws' temperature at step t (0-based) of `iterations`: `temperature` at the first,
  `final_temperature` at the last, linear between (the same throughout when they are equal)."""
  return temperature + (final_temperature - temperature) * (t / max(iterations - 1, 1))


def score(logp, drawn, confidence):
  """The confidence of each position before noise: (B, N) from log-probs (B, N, V) and the
  drawn codes (B, N)."""
  if confidence == 'max':
    return jnp.max(logp, axis=-1)
  return jnp.take_along_axis(logp, drawn[..., None], axis=-1)[..., 0]


@functools.partial(
  jax.jit,
  static_argnames=('model', 'counts', 'confidence', 'top_k', 'top_p', 'guided', 'history'),
)
def _sample(
  variables,
  model,
  cond,
  uncond,
  rng,
  temperature,
  final_temperature,
  choice_temperature,
  cfg_scale,
  init,
  *,
  counts,
  confidence,
  top_k,
  top_p,
  guided,
  history,
):
  b, lc = cond.shape
  n, iterations = model.block_size - lc, len(counts)
  prefix = jnp.concatenate([cond, uncond], axis=0) if guided else cond

  def step(t, carry):
    codes, hist = carry
    unknown = codes == model.mask_id
    x = jnp.concatenate([codes, codes], axis=0) if guided else codes
    logits = model.apply(variables, jnp.concatenate([prefix, x], axis=1))[:, lc:]
    if guided:
      logits = sampling.guide(logits, cfg_scale)
    tau = step_temperature(temperature, final_temperature, t, iterations)
    # As sampling.py: temperature 0 is a select (argmax), not a recompile.
    greedy = tau == 0
    logits = sampling.filter_logits(logits, jnp.where(greedy, 1.0, tau), top_k, top_p)
    k_draw, k_noise = jax.random.split(jax.random.fold_in(rng, t))
    drawn = jax.random.categorical(k_draw, logits, axis=-1)
    drawn = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    scored = score(jax.nn.log_softmax(logits, axis=-1), drawn, confidence)
    noise = choice_temperature * (1.0 - (t + 1) / iterations) * jax.random.gumbel(k_noise, (b, n))
    ranked = jnp.where(unknown, scored + noise, jnp.inf)
    # Rank by confidence (stable, so ties still re-mask exactly counts[t] positions); decoded
    # positions rank last (+inf) and counts[t] < unknown, so they are never re-masked.
    rank = jnp.argsort(jnp.argsort(ranked, axis=-1, stable=True), axis=-1, stable=True)
    remask = rank < jnp.asarray(counts, jnp.int32)[t]
    codes = jnp.where(remask, model.mask_id, jnp.where(unknown, drawn, codes))
    if history:
      hist = lax.dynamic_update_slice(hist, codes[:, None], (0, t, 0))
    return codes, hist

  codes = jnp.full((b, n), model.mask_id, jnp.int32) if init is None else init
  hist = jnp.zeros((b, iterations if history else 0, n), jnp.int32)
  return lax.fori_loop(0, iterations, step, (codes, hist))


def sample_images(
  params,
  model,
  vqgan,
  condition,
  rng,
  *,
  grid,
  num_samples=None,
  iterations=None,
  schedule='cosine',
  temperature=1.0,
  top_k=None,
  top_p=1.0,
  choice_temperature=CHOICE_TEMPERATURE,
  confidence='sampled',
  final_temperature=None,
  cfg_scale=None,
  uncond_tokens=None,
  steps=None,
):
  """`sampling.sample_images` for MaskGIT: returns (tokens (N, h, w) int32, images (N, H, W, C)
  float32, the decoder's output). params: {'gpt': MaskGIT params, 'vqgan': VQGAN params}.
  grid must be the training grid (h * w = block_size - Lc): MaskGIT has no sliding window.
  iterations: as in `sample` (steps: its deprecated name)."""
  iterations = renamed_steps(iterations, steps, ITERATIONS)
  cond_len, num = sampling.check_condition(model, condition, num_samples)
  grid = checks.grid(grid)
  check_grid(model, cond_len, grid)
  condition, uncond_tokens = sampling.repeat_condition(condition, num_samples, uncond_tokens)
  decoding, filters = check_args(
    model,
    condition,
    iterations=iterations,
    schedule=schedule,
    choice_temperature=choice_temperature,
    confidence=confidence,
    final_temperature=final_temperature,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    cfg_scale=cfg_scale,
    uncond_tokens=uncond_tokens,
  )
  need = maskgit_bytes(model, cond_len, filters.guided)
  sampling.check_images_memory(params, condition, need, vqgan, grid, num_samples, num)
  return images_of(params, model, vqgan, condition, uncond_tokens, rng, filters, grid, decoding)


def check_grid(model, cond_len, grid):
  """MaskGIT samples its training grid (h * w = block_size - Lc) only."""
  h, w = grid
  n = model.block_size - cond_len
  if h * w != n:
    raise ValueError(
      f'grid {h}x{w}: MaskGIT samples the training grid ({n} codes) only; larger grids '
      '(the sliding window) need the GPT'
    )


def images_of(params, model, vqgan, condition, uncond, rng, filters, grid, decoding):
  """`sample_images` on checked (B, Lc) conditions (already repeated) and arguments."""
  codes, _ = _decode(params['gpt'], model, condition, uncond, rng, filters, decoding)
  tokens = codes.reshape(-1, *grid)
  return tokens, sampling.decode_codes(vqgan, params['vqgan'], tokens)
