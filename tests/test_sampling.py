"""Logit filtering (vs hand computations, taming and HF), the KV-cached sampler and the
sliding window (vs a slow re-implementation of taming's procedure with full forwards)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import sampling
from vqgan_jax.models import transformer as tf

V, BLOCK = 33, 32
NEG = -np.inf


@pytest.fixture(scope='module')
def model():
  return tf.GPT(V, BLOCK, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope='module')
def params(model):
  p = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, BLOCK), jnp.int32)))
  p = p['params']
  # Spread the output distribution (init logits are nearly uniform), make positions matter
  # (pos_emb starts at zero) and tokens as much, so wrong context or positions change tokens.
  p['head']['kernel'] = p['head']['kernel'] * 10.0
  p['tok_emb']['embedding'] = p['tok_emb']['embedding'] * 25.0
  p['pos_emb'] = 0.5 * jax.random.normal(jax.random.key(1), p['pos_emb'].shape)
  return p


@pytest.fixture(scope='module')
def forward(model):
  return jax.jit(model.apply)


# ----------------------------------------------------------------------------------------
# filter_logits
# ----------------------------------------------------------------------------------------


def _f(x, **kw):
  return np.asarray(sampling.filter_logits(jnp.asarray(x, jnp.float32), **kw))


def test_filter_temperature_and_disabled():
  x = np.array([[1.0, -2.0, 3.0, 0.5]])
  np.testing.assert_allclose(_f(x, temperature=2.0), x / 2.0)
  for kw in ({}, {'top_k': None}, {'top_k': 0}, {'top_p': 1.0}, {'top_p': None}):
    np.testing.assert_array_equal(_f(x, **kw), x)


def test_filter_top_k_keeps_ties_after_temperature():
  x = np.array([[1.0, 3.0, 2.0, 2.0, 0.0, 2.0]])
  np.testing.assert_array_equal(_f(x, top_k=2), [[NEG, 3.0, 2.0, 2.0, NEG, 2.0]])
  np.testing.assert_array_equal(_f(x, top_k=1), [[NEG, 3.0, NEG, NEG, NEG, NEG]])
  np.testing.assert_array_equal(_f(x, top_k=100), x)  # k > vocab keeps all
  np.testing.assert_array_equal(_f(x, temperature=0.5, top_k=1), [[NEG, 6.0, NEG, NEG, NEG, NEG]])


def test_kth_largest_equals_top_k():
  """The sort-free k-th largest vs a sort: ties, +-inf, +-0, tiny and huge magnitudes."""
  rng = np.random.default_rng(0)
  kth = jax.jit(sampling.kth_largest)  # k traced: one compile per row length
  for v in (1, 2, 7, 513):
    rows = []
    for trial in range(24):
      x = rng.standard_normal(v).astype(np.float32) * [1e-30, 1e-3, 1, 1e30][trial % 4]
      if trial % 3 == 0:
        x = np.round(x * 2) / 2
      if trial % 5 == 0:
        x[::7] = NEG
      if trial % 7 == 0:
        x[1::9] = np.inf
      if trial % 2 == 0:
        x[::4] = -0.0
      rows.append(x)
    x = np.stack(rows)
    for k in sorted({1, v, int(rng.integers(1, v + 1)), min(v, 100)}):
      want = np.sort(x, axis=-1)[:, v - k : v - k + 1]
      np.testing.assert_array_equal(kth(x, k), want, err_msg=f'v={v} k={k}')
  x = jnp.asarray(rows)
  np.testing.assert_array_equal(sampling.kth_largest(x, 100), jax.lax.top_k(x, 100)[0][:, -1:])


def test_filter_top_p_shifted_keep():
  probs = np.array([0.5, 0.05, 0.3, 0.15])
  x = np.log(probs)[None]
  # Sorted: 0.5, 0.3, 0.15, 0.05; cumulative 0.5, 0.8, 0.95, 1.0.
  # p=0.6: 0.8 is the first to cross and is kept; 0.15 and 0.05 go.
  np.testing.assert_array_equal(np.isfinite(_f(x, top_p=0.6)), [[1, 0, 1, 0]])
  # p=0.85: the 0.15 token crosses (0.95) and stays.
  np.testing.assert_array_equal(np.isfinite(_f(x, top_p=0.85)), [[1, 0, 1, 1]])
  # Tiny p: only the most likely token, never an empty set.
  np.testing.assert_array_equal(np.isfinite(_f(x, top_p=1e-3)), [[1, 0, 0, 0]])
  np.testing.assert_array_equal(np.isfinite(_f(x, top_p=0.0)), [[1, 0, 0, 0]])
  # Kept logits are unchanged; top-p is applied after top-k (renormalised over the top 2:
  # 0.625, 0.375 -> p=0.6 keeps only the first).
  np.testing.assert_allclose(_f(x, top_p=0.6)[0, [0, 2]], x[0, [0, 2]])
  np.testing.assert_array_equal(np.isfinite(_f(x, top_k=2, top_p=0.6)), [[1, 0, 0, 0]])


def _same_filter(got, want):
  """Same kept set; kept values equal up to the last bit of the division (XLA may use x*(1/t))."""
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_filter_matches_original_implementations():
  torch = pytest.importorskip('torch', reason='torch not installed ([reference] extra)')
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(16, 100)).astype(np.float32) * 3
  logits[:, 7] = logits[:, 8]  # a tie somewhere
  try:
    from vqgan_jax.testing import reference

    mingpt = reference._import_taming('taming.modules.transformer.mingpt')
  except ImportError as e:
    pytest.skip(f'original taming-transformers not importable: {e}')
  for k in (1, 5, 40):
    want = mingpt.top_k_logits(torch.from_numpy(logits / 0.7), k).numpy()
    _same_filter(_f(logits, temperature=0.7, top_k=k), want)
  try:
    from transformers import top_k_top_p_filtering
  except ImportError:
    pytest.skip('transformers.top_k_top_p_filtering not available (transformers >= 4.39)')
  for k, p in ((0, 0.9), (50, 0.5), (10, 0.95), (30, 1.0)):
    want = top_k_top_p_filtering(torch.from_numpy(logits.copy()), top_k=k, top_p=p).numpy()
    _same_filter(_f(logits, top_k=k, top_p=p), want)


# ----------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------

COND = jnp.array([[3], [5], [3]], jnp.int32)


def test_sample_deterministic_and_greedy(model, params, forward):
  a = sampling.sample(params, model, COND, jax.random.key(7), steps=12, top_k=5)
  b = sampling.sample(params, model, COND, jax.random.key(7), steps=12, top_k=5)
  c = sampling.sample(params, model, COND, jax.random.key(8), steps=12, top_k=5)
  assert a.shape == (3, 12) and a.dtype == jnp.int32
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))
  assert int(a.min()) >= 0 and int(a.max()) < V
  # The scan layout is accepted (unstacked outside the decode loop).
  scanned = sampling.sample(
    tf.stack_layers({'params': params}),
    model.clone(scan_layers=True),
    COND,
    jax.random.key(7),
    steps=12,
    top_k=5,
  )
  np.testing.assert_array_equal(scanned, a)
  # Inside a caller's jit (as the benchmarks call it): the params are tracers there.
  jitted = jax.jit(lambda p: sampling.sample(p, model, COND, jax.random.key(7), steps=12, top_k=5))
  np.testing.assert_array_equal(jitted(params), a)

  greedy = sampling.sample(params, model, COND, jax.random.key(0), steps=12, top_k=1)
  seq = np.zeros((3, 13), np.int32)  # one shape: causality makes the padding harmless
  seq[:, :1] = COND
  for t in range(12):
    logits = forward({'params': params}, jnp.asarray(seq))[:, t]
    seq[:, t + 1] = np.argmax(logits, -1)
  np.testing.assert_array_equal(greedy, seq[:, 1:])
  # A cache grown in segments (several decode loops; 5 does not divide the 13 slots) draws
  # the same tokens. One compile per (segment, top_k): greedy on one, sampled on the other.
  np.testing.assert_array_equal(
    sampling.sample(params, model, COND, jax.random.key(0), steps=12, top_k=1, cache_segment=1),
    greedy,
  )
  np.testing.assert_array_equal(
    sampling.sample(params, model, COND, jax.random.key(7), steps=12, top_k=5, cache_segment=5), a
  )


def test_temperature_zero_is_greedy(model, params):
  """temperature 0 is argmax, also when traced by the caller's jit; it shares the sampled
  compile (top_k=5 here), so greedy needs no recompile."""
  greedy = sampling.sample(params, model, COND, jax.random.key(0), steps=12, top_k=1)
  np.testing.assert_array_equal(
    sampling.sample(params, model, COND, jax.random.key(7), steps=12, top_k=5, temperature=0.0),
    greedy,
  )
  traced = jax.jit(
    lambda t: sampling.sample(
      params, model, COND, jax.random.key(9), steps=12, top_k=5, temperature=t
    )
  )
  np.testing.assert_array_equal(traced(jnp.float32(0.0)), greedy)
  assert np.any(np.asarray(traced(jnp.float32(1.0))) != np.asarray(greedy))


# Each bad argument, per public sampler; params None shows the check runs before any model
# code (no compile, no decode).
_BAD_ARGS = [
  ({'temperature': -1.0}, 'temperature must be >= 0'),
  ({'temperature': float('nan')}, 'temperature must be >= 0'),
  ({'top_k': -3}, 'top_k must be an integer >= 0'),
  ({'top_k': 2.5}, 'top_k must be an integer >= 0'),
  ({'top_p': 0.0}, r'top_p must be in \(0, 1\]'),
  ({'top_p': 1.5}, r'top_p must be in \(0, 1\]'),
]


@pytest.mark.parametrize('kwargs,match', _BAD_ARGS)
@pytest.mark.parametrize('fn', ['sample', 'sample_images', 'sliding_window_sample'])
def test_bad_sampling_arguments_are_refused(model, fn, kwargs, match):
  cond = jnp.array([[3], [5]], jnp.int32)
  with pytest.raises(ValueError, match=match):
    if fn == 'sample':
      sampling.sample(None, model, cond, jax.random.key(0), steps=4, **kwargs)
    elif fn == 'sample_images':
      sampling.sample_images(
        {'gpt': None, 'vqgan': None}, model, None, cond, jax.random.key(0), grid=(2, 2), **kwargs
      )
    else:
      sampling.sliding_window_sample(
        None, model, cond, jax.random.key(0), grid_h=6, grid_w=6, window=4, **kwargs
      )


def test_sequence_longer_than_block_size_is_refused(model):
  cond = jnp.array([[3]], jnp.int32)
  key = jax.random.key(0)
  nothing = {'gpt': None, 'vqgan': None}
  with pytest.raises(ValueError, match=r'grid=\(6, 6\) .* block_size 32'):
    sampling.sample_images(nothing, model, None, cond, key, grid=(6, 6))
  with pytest.raises(ValueError, match='steps=33 .* block_size 32'):
    sampling.sample(None, model, cond, key, steps=33)
  with pytest.raises(ValueError, match='window=6 .* block_size 32'):
    sampling.sample_images(nothing, model, None, cond, key, grid=(8, 8), window=6)
  with pytest.raises(ValueError, match='window=6 .* block_size 32'):
    sampling.sliding_window_sample(None, model, cond, key, grid_h=8, grid_w=8, window=6)
  with pytest.raises(ValueError, match='grid must be'):
    sampling.sample_images(nothing, model, None, cond, key, grid=(0, 4))


def test_class_conditional_first_step_distribution(model, params, forward):
  """Step-0 draws (many rows, one call) follow softmax(full-forward logits | class / T)."""
  n = 4096
  for cls in (3, 9):
    cond = jnp.full((n, 1), cls, jnp.int32)
    toks = np.asarray(
      sampling.sample(params, model, cond, jax.random.key(cls), steps=1, temperature=1.5)
    )[:, 0]
    freq = np.bincount(toks, minlength=V) / n
    probs = np.asarray(jax.nn.softmax(forward({'params': params}, cond[:1])[0, -1] / 1.5))
    assert np.abs(freq - probs).max() < 0.03, (cls, np.abs(freq - probs).max())
  p3 = jax.nn.softmax(forward({'params': params}, jnp.array([[3]]))[0, -1])
  p9 = jax.nn.softmax(forward({'params': params}, jnp.array([[9]]))[0, -1])
  assert float(jnp.abs(p3 - p9).max()) > 0.1  # the class changes the distribution


def test_classifier_free_guidance(model, params):
  uncond = jnp.zeros_like(COND)
  base = sampling.sample(params, model, COND, jax.random.key(3), steps=8)
  scale1 = sampling.sample(
    params, model, COND, jax.random.key(3), steps=8, cfg_scale=1.0, uncond_tokens=uncond
  )
  np.testing.assert_array_equal(scale1, base)
  guided = sampling.sample(
    params, model, COND, jax.random.key(3), steps=8, cfg_scale=2.0, uncond_tokens=uncond
  )
  np.testing.assert_array_equal(
    guided,
    sampling.sample(
      params,
      model,
      COND,
      jax.random.key(3),
      steps=8,
      cfg_scale=2.0,
      uncond_tokens=uncond,
      cache_segment=3,
    ),
  )
  scale0 = sampling.sample(
    params, model, COND, jax.random.key(3), steps=8, cfg_scale=0.0, uncond_tokens=uncond
  )
  np.testing.assert_array_equal(
    scale0, sampling.sample(params, model, uncond, jax.random.key(3), steps=8)
  )


# ----------------------------------------------------------------------------------------
# Sliding window
# ----------------------------------------------------------------------------------------


def _taming_sliding(forward, params, cond, rng, h, w, win, top_k):
  """Slow re-implementation of taming's procedure (f.3): one full forward per position."""
  half = win // 2
  b = cond.shape[0]
  is_grid = cond.shape[1] == h * w
  cgrid = np.asarray(cond).reshape(b, h, w) if is_grid else None
  idx = np.zeros((b, h, w), np.int32)
  for i in range(h):
    li = i if i <= half else (win - (h - i) if h - i < half else half)
    for j in range(w):
      lj = j if j <= half else (win - (w - j) if w - j < half else half)
      r0, c0 = i - li, j - lj
      patch = idx[:, r0 : r0 + win, c0 : c0 + win].reshape(b, -1)
      cpatch = (
        cgrid[:, r0 : r0 + win, c0 : c0 + win].reshape(b, -1) if is_grid else np.asarray(cond)
      )
      seq = np.concatenate([cpatch, patch], axis=1)
      logits = forward({'params': params}, jnp.asarray(seq[:, :-1]))
      logits = logits[:, -win * win :].reshape(b, win, win, -1)[:, li, lj]
      idx[:, i, j] = _draw(logits, jax.random.fold_in(rng, i * w + j), top_k)
  return idx


@functools.partial(jax.jit, static_argnums=2)
def _draw(logits, key, top_k):
  return jax.random.categorical(key, sampling.filter_logits(logits, 1.0, top_k), axis=-1)


@pytest.mark.parametrize('cond_kind', ['sos', 'grid'])
def test_sliding_window_matches_taming_procedure(model, params, forward, cond_kind):
  h, w, win, b = 6, 7, 4, 2
  if cond_kind == 'sos':
    cond = jnp.array([[0], [4]], jnp.int32)
  else:
    cond = jax.random.randint(jax.random.key(2), (b, h * w), 0, V)
  rng = jax.random.key(11)
  # Greedy decoding compares the tokens; with sampling (SOS case, to save a compile) the same
  # per-position keys must give the same draws too.
  top_k = 1 if cond_kind == 'grid' else None
  if True:
    got = sampling.sliding_window_sample(
      params, model, cond, rng, grid_h=h, grid_w=w, window=win, top_k=top_k
    )
    assert got.shape == (b, h, w) and got.dtype == jnp.int32
    assert int(got.min()) >= 0 and int(got.max()) < V
    np.testing.assert_array_equal(
      got, _taming_sliding(forward, params, cond, rng, h, w, win, top_k)
    )


def test_sliding_window_first_window_equals_plain_sampler(model, params):
  win = 4
  cond = jnp.array([[0], [4]], jnp.int32)
  rng = jax.random.key(5)
  grid = sampling.sliding_window_sample(
    params, model, cond, rng, grid_h=win, grid_w=win, window=win, top_k=10
  )
  plain = sampling.sample(params, model, cond, rng, steps=win * win, top_k=10)
  np.testing.assert_array_equal(np.asarray(grid).reshape(2, -1), plain)
  with pytest.raises(ValueError, match='even'):
    sampling.sliding_window_sample(params, model, cond, rng, grid_h=5, grid_w=5, window=5)


def test_sample_images_decodes_the_sampled_codes(model, params):
  """`sample_images`: one condition repeated num_samples times, the tokens of `sample`, and
  the stage-1 decoder's images of exactly those codes."""
  from vqgan_jax.models.vqgan import VQGAN  # pylint: disable=g-import-not-at-top

  vqgan = VQGAN(
    ch=32,
    ch_mult=(1, 1),
    num_res_blocks=1,
    attn_resolutions=(),
    resolution=8,
    in_channels=1,
    out_ch=1,
    z_channels=4,
    n_embed=V,
    embed_dim=4,
    dropout=0.0,
  )
  vq_params = jax.jit(vqgan.init)(jax.random.key(2), jnp.zeros((1, 8, 8, 1)))['params']
  both = {'gpt': params, 'vqgan': vq_params}
  tokens, images = sampling.sample_images(
    both, model, vqgan, jnp.array([3]), jax.random.key(5), grid=(4, 4), num_samples=3, top_k=5
  )
  want = sampling.sample(
    params, model, jnp.full((3, 1), 3, jnp.int32), jax.random.key(5), steps=16, top_k=5
  )
  np.testing.assert_array_equal(tokens, np.asarray(want).reshape(3, 4, 4))
  assert images.shape == (3, 8, 8, 1) and images.dtype == jnp.float32
  np.testing.assert_allclose(
    images, vqgan.apply({'params': vq_params}, tokens, method='decode_indices'), atol=1e-4
  )
  with pytest.raises(ValueError, match='num_samples repeats one condition'):
    sampling.sample_images(
      both, model, vqgan, jnp.array([[3], [4]]), jax.random.key(5), grid=(4, 4), num_samples=3
    )
