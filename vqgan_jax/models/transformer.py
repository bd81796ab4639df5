"""The stage-2 GPT of Taming Transformers (taming's minGPT), in flax.linen.

Numerics follow `taming/modules/transformer/mingpt.py`: pre-LN blocks, LayerNorm eps 1e-5,
separate key/query/value Linears with bias, exact (erf) GELU, a learned position embedding
initialised to zero, `head` without bias, N(0, 0.02) weights and zero biases. `n_unmasked` of
the original is always 0 in taming's configs and is not supported.

Parameter names map one-to-one onto the original state-dict keys (the `transformer.` prefix
of a Net2NetTransformer checkpoint dropped; torch Linear weights are (out, in), flax kernels
(in, out), so they are transposed; `attn.mask` is a buffer, recomputed, never loaded;
`vqgan_jax/convert/param_mapping.py` converts both ways):

  torch key                                   flax path (canonical layout)      logical axes
  tok_emb.weight           [V, C]             tok_emb/embedding     [V, C]      (vocab, embed)
  pos_emb                  [1, T, C]          pos_emb               [1, T, C]   (-, -, embed)
  blocks.{l}.ln1.weight/bias   [C]            blocks_{l}/ln1/scale, bias [C]    (embed,)
  blocks.{l}.ln2.weight/bias   [C]            blocks_{l}/ln2/scale, bias [C]    (embed,)
  blocks.{l}.attn.key.weight   [C, C]         blocks_{l}/attn/key/kernel [C, C] (embed, heads)
  blocks.{l}.attn.key.bias     [C]            blocks_{l}/attn/key/bias   [C]    (heads,)
    (same for attn.query, attn.value)
  blocks.{l}.attn.proj.weight  [C, C]         blocks_{l}/attn/proj/kernel [C, C] (heads, embed)
  blocks.{l}.attn.proj.bias    [C]            blocks_{l}/attn/proj/bias  [C]    (embed,)
  blocks.{l}.mlp.0.weight  [4C, C]            blocks_{l}/mlp_0/kernel [C, 4C]   (embed, mlp)
  blocks.{l}.mlp.0.bias    [4C]               blocks_{l}/mlp_0/bias   [4C]      (mlp,)
  blocks.{l}.mlp.2.weight  [C, 4C]            blocks_{l}/mlp_2/kernel [4C, C]   (mlp, embed)
  blocks.{l}.mlp.2.bias    [C]                blocks_{l}/mlp_2/bias   [C]       (embed,)
  ln_f.weight/bias         [C]                ln_f/scale, bias      [C]         (embed,)
  head.weight              [V, C]             head/kernel           [C, V]      (embed, vocab)

The C axis of key/query/value is viewed as (n_head, head_dim), head-major, exactly as torch's
`.view(B, T, n_head, hd)`, so no permutation is needed.

Two layouts. `GPT(scan_layers=False)` (the default) owns one `blocks_{l}` subtree per layer:
the canonical layout of checkpoints and conversion, and the one the sampler runs on (per-layer
weights are loop invariants of its decode loop; indexing stacked weights inside a loop copies
them every step). `GPT(scan_layers=True)` runs the layers under `nn.scan` (one layer to
compile; on XLA:CPU it trains slower than unrolled layers: the benchmark GPT's bf16 step 1468
against 847 ms on an AVX-512 VM, the demo GPT's float32 step 1.06 against 0.97 s on an AVX2 VM,
experiments/bench_stage2.py) and its `init` produces one `blocks` subtree whose leaves carry a
leading layer axis (logical name `layers`). `stack_layers` / `unstack_layers` convert between
the two; both models compute the same function.
"""

from typing import Any
from typing import Mapping

import flax.linen as nn
import jax
from jax import lax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from vqgan_jax.kernels.mixed import mixed_einsum

Dtype = Any

LN_EPS = 1e-5
INIT_STD = 0.02

# Logical axes of one K/V cache entry, (batch, heads, length, head_dim).
CACHE_AXES = ('batch', 'heads', 'length', 'kv')


# Names of the dot outputs, for remat policies. The policies that save dots find them by
# primitive, and `mixed_einsum`'s dots sit inside a custom VJP where they cannot see them: in
# bf16 'dots_with_no_batch_dims_saveable' would silently save nothing. `remat_policy` adds the
# named dots those policies mean.
DENSE_DOT = 'dense_dot'  # x @ kernel: no batch dimensions
ATTENTION_DOT = 'attention_dot'  # q.k and p.v: batched over (batch, heads)
_DOT_POLICY_NAMES = {
  'dots_saveable': (DENSE_DOT, ATTENTION_DOT),
  'checkpoint_dots': (DENSE_DOT, ATTENTION_DOT),
  'dots_with_no_batch_dims_saveable': (DENSE_DOT,),
  'checkpoint_dots_with_no_batch_dims': (DENSE_DOT,),
}


def remat_policy(name):
  """The `jax.checkpoint_policies` policy `name` (None: save nothing), extended to our dots."""
  if name is None or name is True:
    return None
  policy = getattr(jax.checkpoint_policies, name)
  if name in _DOT_POLICY_NAMES:
    policy = jax.checkpoint_policies.save_from_both_policies(
      policy, jax.checkpoint_policies.save_only_these_names(*_DOT_POLICY_NAMES[name])
    )
  return policy


def _einsum(spec, a, b, dtype, name):
  """float32: the exact einsum (plain autodiff); lower precision: `mixed_einsum`."""
  a, b = a.astype(dtype), b.astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:
    out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  else:
    out = mixed_einsum(spec, a, b)
  return checkpoint_name(out, name)


def _dense_dot(dtype):
  """A `dot_general` for nn.Dense (x (..., in) . kernel (in, out)) through `_einsum`."""

  def dot_general(x, kernel, dimension_numbers, precision=None, **unused):
    del precision
    if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or kernel.ndim != 2:
      raise ValueError(f'unexpected Dense dot {dimension_numbers}')
    return _einsum('...i,io->...o', x, kernel, dtype, DENSE_DOT)

  return dot_general


def _dense(features, axes, dtype, use_bias=True, name=None):
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    dot_general=_dense_dot(dtype),
    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
    name=name,
  )


def _layer_norm(x, name):
  """torch LayerNorm (eps 1e-5), statistics and output in float32 whatever the compute dtype."""
  return nn.LayerNorm(
    epsilon=LN_EPS,
    dtype=jnp.float32,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
    name=name,
  )(x.astype(jnp.float32))


def gelu(x):
  """Exact GELU, x * Phi(x), written with erf as torch's kernel computes it. jax.nn.gelu's
  erfc form is more accurate far below zero (where both are ~0) and cost ~7% of the demo
  GPT's training step on XLA:CPU (erfc's exponential and branches)."""
  return 0.5 * x * (1.0 + lax.erf(x * np.float32(1 / np.sqrt(2))).astype(x.dtype))


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention; with a cache, attends to cache slots [0, pos + t].
  `causal=False` attends everywhere (MaskGIT's bidirectional transformer; no cache)."""

  n_head: int
  dtype: Dtype = jnp.float32
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  deterministic: bool = True
  causal: bool = True

  @nn.compact
  def __call__(self, x, cache=None, pos=None):
    b, t, c = x.shape
    hd = c // self.n_head

    def heads(name):  # (B, T, C) -> (B, H, T, hd): heads leading, so dots need no transposes
      y = _dense(c, ('embed', 'heads'), self.dtype, name=name)(x)
      return y.astype(self.dtype).reshape(b, t, self.n_head, hd).transpose(0, 2, 1, 3)

    k, q, v = heads('key'), heads('query'), heads('value')
    if cache is None:
      mask = jnp.tril(jnp.ones((t, t), bool)) if self.causal else None
    else:
      k = lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, 0, pos, 0))
      v = lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, 0, pos, 0))
      cache = {'k': k, 'v': v}
      # Query t sits at absolute position pos + t; slots beyond it are stale or empty.
      mask = jnp.arange(k.shape[2])[None, :] <= pos + jnp.arange(t)[:, None]
    # Decoding attends in float32 over a float32 cache whatever the compute dtype: its dots
    # (one query against the cache) are matrix-vector products, for which XLA:CPU's bf16
    # path measured ~30% slower per sampled token than float32.
    adt = self.dtype if cache is None else jnp.float32
    att = _einsum('bhqd,bhkd->bhqk', q, k, adt, ATTENTION_DOT) * (1.0 / np.sqrt(hd))
    if mask is not None:
      att = jnp.where(mask, att, -jnp.inf)
    att = jax.nn.softmax(att, axis=-1)
    att = nn.Dropout(self.attn_pdrop)(att, deterministic=self.deterministic)
    y = _einsum('bhqk,bhkd->bhqd', att, v, adt, ATTENTION_DOT)
    y = y.astype(self.dtype).transpose(0, 2, 1, 3).reshape(b, t, c)
    y = _dense(c, ('heads', 'embed'), self.dtype, name='proj')(y)
    y = nn.Dropout(self.resid_pdrop)(y, deterministic=self.deterministic)
    return y, cache


class Block(nn.Module):
  """Pre-LN transformer block. Returns (x, cache) so that it is also an `nn.scan` body."""

  n_head: int
  dtype: Dtype = jnp.float32
  attn_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  deterministic: bool = True
  causal: bool = True

  @nn.compact
  def __call__(self, x, cache=None, pos=None):
    c = x.shape[-1]
    # The residual stream stays float32; sublayers compute in self.dtype.
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    h, cache = CausalSelfAttention(
      self.n_head,
      self.dtype,
      self.attn_pdrop,
      self.resid_pdrop,
      self.deterministic,
      self.causal,
      name='attn',
    )(_layer_norm(x, 'ln1'), cache, pos)
    x = x + h.astype(jnp.float32)
    h = _dense(4 * c, ('embed', 'mlp'), self.dtype, name='mlp_0')(_layer_norm(x, 'ln2'))
    h = gelu(h)
    h = _dense(c, ('mlp', 'embed'), self.dtype, name='mlp_2')(h)
    h = nn.Dropout(self.resid_pdrop)(h, deterministic=self.deterministic)
    return x + h.astype(jnp.float32), cache


class TokenEmbed(nn.Module):
  """nn.Embed's parameter (`embedding`, (vocab, embed)), looked up in its activation layout.

  The table is stored with `embed` over fsdp like every weight, but gathered whole along
  `embed` before the lookup (the FSDP all-gather), so the looked-up rows come out
  batch-sharded and the table's gradient is a reduce-scatter. Looking rows up in the stored
  layout instead leaves them embed-sharded, and the backward has to move the batch-sharded
  residual-stream gradient onto that layout: SPMD does it by replicating the whole gradient
  ("involuntary full rematerialization").
  """

  vocab_size: int
  features: int

  @nn.compact
  def __call__(self, tokens):
    table = self.param(
      'embedding',
      nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ('vocab', 'embed')),
      (self.vocab_size, self.features),
    )
    table = nn.with_logical_constraint(table, ('vocab', 'act_embed'))
    return jnp.take(table, tokens, axis=0)


def run_blocks(model, x, deterministic, cache=None, pos=0, causal=True):
  """`model`'s `n_layer` blocks over x, as submodules of `model` (call it inside one of its
  compact methods): `blocks_{l}` per layer, or one `blocks` under `nn.scan` with
  `model.scan_layers`; `model.remat` applies without a cache. Reads `model`'s n_layer, n_head,
  dtype, attn_pdrop, resid_pdrop, remat and scan_layers. Returns (x, new cache or None)."""
  block = Block
  if model.remat and cache is None:
    block = nn.remat(Block, policy=remat_policy(model.remat), prevent_cse=not model.scan_layers)
  kw = dict(
    n_head=model.n_head,
    dtype=model.dtype,
    attn_pdrop=model.attn_pdrop,
    resid_pdrop=model.resid_pdrop,
    deterministic=deterministic,
    causal=causal,
  )
  if model.scan_layers:
    x, _ = nn.scan(
      block,
      variable_axes={'params': 0},
      split_rngs={'params': True, 'dropout': True},
      length=model.n_layer,
      metadata_params={nn.PARTITION_NAME: 'layers'},
    )(**kw, name='blocks')(x, None)
    return x, None
  new_cache = []
  for l in range(model.n_layer):
    x, c = block(**kw, name=f'blocks_{l}')(x, None if cache is None else cache[l], pos)
    new_cache.append(c)
  return x, None if cache is None else tuple(new_cache)


class GPT(nn.Module):
  """taming's minGPT. `__call__(tokens) -> logits (B, T, vocab)` in float32.

  Attributes:
    dtype: compute dtype of the matmuls (softmax, LayerNorm statistics, the residual stream
      and the logits stay float32). Parameters are always float32.
    remat: False, True (recompute everything per block) or the name of a
      `jax.checkpoint_policies` policy, e.g. 'dots_with_no_batch_dims_saveable'.
    scan_layers: run the blocks under `nn.scan` over stacked params (training layout, see the
      module docstring); `decode` needs the per-layer layout.
  """

  vocab_size: int
  block_size: int
  n_layer: int = 12
  n_head: int = 8
  n_embd: int = 256
  embd_pdrop: float = 0.0
  resid_pdrop: float = 0.0
  attn_pdrop: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool | str = False
  scan_layers: bool = False

  def __call__(self, tokens, deterministic: bool = True):
    if tokens.shape[1] > self.block_size:
      raise ValueError(f'sequence length {tokens.shape[1]} > block_size {self.block_size}')
    logits, _ = self._forward(tokens, deterministic, None, 0, None)
    return logits

  def decode(self, tokens, cache, pos, logits_at=None):
    """Runs tokens (B, T_new) at absolute positions [pos, pos + T_new) against `cache`.

    Use T_new > 1 to prefill (from pos=0), then T_new=1 per step. Cache slots >= pos are
    overwritten before they are attended to, so stale contents there are harmless.
    Returns (logits, cache): logits (B, T_new, vocab) float32, or (B, vocab) for the single
    position `logits_at` (an index into T_new, may be traced) which skips the head elsewhere.
    """
    if self.scan_layers:
      raise ValueError(
        'decode needs per-layer params: use unstack_layers(params) and '
        'model.clone(scan_layers=False)'
      )
    return self._forward(tokens, True, cache, pos, logits_at)

  def init_cache(self, batch: int, max_len: int, dtype: Dtype | None = None):
    """Preallocated K/V cache: per layer {'k', 'v'} of (batch, n_head, max_len, head_dim);
    float32 (decoding attends in float32) unless `dtype` says otherwise."""
    if max_len > self.block_size:
      raise ValueError(f'cache length {max_len} > block_size {self.block_size}')
    shape = (batch, self.n_head, max_len, self.n_embd // self.n_head)
    dtype = jnp.float32 if dtype is None else dtype  # decoding attends in float32
    return tuple(
      {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)} for _ in range(self.n_layer)
    )

  @nn.compact
  def _forward(self, tokens, deterministic, cache, pos, logits_at):
    x = embed(self, tokens, pos, deterministic, nn.initializers.zeros_init())
    x, cache = run_blocks(self, x, deterministic, cache, pos)
    if logits_at is not None:
      x = lax.dynamic_index_in_dim(x, logits_at, axis=1, keepdims=False)
    x = _layer_norm(x, 'ln_f')
    logits = _dense(self.vocab_size, ('embed', 'vocab'), self.dtype, use_bias=False, name='head')(x)
    return logits.astype(jnp.float32), cache


def embed(module, tokens, pos, deterministic, pos_init):
  """The GPT's and MaskGIT's input, called from their compact method: token plus learned
  position embeddings ('tok_emb', 'pos_emb' initialised by pos_init) of tokens (B, T) at
  positions [pos, pos + T), with dropout."""
  if module.n_embd % module.n_head:
    raise ValueError(f'n_embd {module.n_embd} not divisible by n_head {module.n_head}')
  x = TokenEmbed(module.vocab_size, module.n_embd, name='tok_emb')(tokens)
  pos_emb = module.param(
    'pos_emb',
    nn.with_logical_partitioning(pos_init, (None, None, 'embed')),
    (1, module.block_size, module.n_embd),
  )
  pos_emb = nn.with_logical_constraint(pos_emb, (None, None, 'act_embed'))
  x = x + lax.dynamic_slice_in_dim(pos_emb, pos, tokens.shape[1], axis=1)
  x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
  return nn.Dropout(module.embd_pdrop)(x, deterministic=deterministic)


# ----------------------------------------------------------------------------------------
# Layout converters
# ----------------------------------------------------------------------------------------


def _inner(params):
  """Accepts {'params': tree} or the tree itself; returns (tree, rewrap)."""
  if isinstance(params, Mapping) and set(params) == {'params'}:
    return params['params'], lambda p: {'params': p}
  return params, lambda p: p


def stack_layers(params):
  """Per-layer `blocks_{l}` -> `blocks` with a leading layer axis (the scan_layers layout)."""
  p, wrap = _inner(nn.unbox(params))
  n = sum(1 for k in p if k.startswith('blocks_'))
  out = {k: v for k, v in p.items() if not k.startswith('blocks_')}
  out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[f'blocks_{l}'] for l in range(n)])
  return wrap(out)


def unstack_layers(params):
  """`blocks` with a leading layer axis -> per-layer `blocks_{l}` (the canonical layout)."""
  p, wrap = _inner(nn.unbox(params))
  out = {k: v for k, v in p.items() if k != 'blocks'}
  n = jax.tree.leaves(p['blocks'])[0].shape[0]
  for l in range(n):
    out[f'blocks_{l}'] = jax.tree.map(lambda x: x[l], p['blocks'])
  return wrap(out)
