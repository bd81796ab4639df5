"""Stage-2 throughput: the GPT train step and the sampler, vs the original PyTorch code.

  python experiments/bench_stage2.py [--iters=5] [--no_reference] [--dtypes=float32,bfloat16]
      [--layouts=scan,unrolled]

The issue's workload: batch 8 x 256 tokens (SOS + 256 codes), 8 layers, 8 heads, 512 wide,
vocab 513 (512 codes + SOS), AdamW; sampling 256 tokens for 8 sequences, top-k 100,
temperature 1. Prints one JSON object per line: `name`, `tokens_per_s`, and with the
[reference] extra installed `original_tokens_per_s` and `ratio_vs_original` (ours / original),
timed in the same process in alternation with ours (A, B, A, B: both see the same machine
load; medians, and `*_best` for the fastest repetition), with `--threads` torch threads:

* stage2_train_step: our sharded, donated `stage2.make_train_step`, per dtype and per layer
  layout (`scan_layers`: the base config's `nn.scan`, or unrolled `blocks_{l}`), vs the original GPT
  (`vqgan_jax.testing.reference.build_gpt`) with taming's AdamW parameter groups (decay on Linear
  weights only), cross-entropy over the image positions, backward and step. Also the achieved
  GFLOP/s: (6 x matmul params x tokens + 12 x layers x T^2 x width x batch) / step time.
* stage2_sample: `sampling.sample` (preallocated KV cache, one jitted loop) vs
  `sample_with_past` of taming's scripts/sample_fast.py (a KV cache re-concatenated every
  step). That script is not in the pip package; its loop is re-implemented here over the
  original GPT's `forward_with_past` (which is): step 0 feeds the conditioning, later steps
  one token with all presents concatenated along time, logits / temperature, HF
  `top_k_top_p_filtering`, softmax, multinomial.
* stage2_sample_dots (`--only=dots`): what bounds one decode step on this machine. The step's
  weight dots alone (every layer's qkv, projection and MLP matrices and the head, `batch`
  rows each, one jitted chain, random weights of the bench model's shapes) against one
  streaming read of the same bytes: `dots_gb_per_s` is the weights' bytes over the chain's
  time, `stream_gb_per_s` what memory delivers to a plain reduction over them.
* stage2_sample_recompute: the same sampler vs `Net2NetTransformer.sample`, which reruns the
  GPT on the whole prefix for every token (--orig_recompute_steps to shorten it; the row
  then says how many steps were timed, and per-token cost grows with the prefix).
"""

import os
import statistics
import time
import types

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import machine
import numpy as np

from vqgan_jax import config_base
from vqgan_jax import parallel
from vqgan_jax import sampling
from vqgan_jax.train import stage2
from vqgan_jax.train import stage2_config

_ITERS = flags.DEFINE_integer('iters', 5, 'Timed repetitions (median is reported).')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed repetitions after compilation.')
_THREADS = flags.DEFINE_integer('threads', 2, 'Torch threads for the original.')
_NO_REF = flags.DEFINE_bool('no_reference', False, 'Skip the original even if installed.')
_DTYPES = flags.DEFINE_list(
  'dtypes',
  ['float32', 'bfloat16'],
  'Compute dtypes of ours; each is timed against the same original.',
)
_LAYOUTS = flags.DEFINE_list(
  'layouts',
  ['scan', 'unrolled'],
  "Layer layouts of ours' train step: 'scan' (the base config, pods) and/or 'unrolled'.",
)
_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per step / sampled in parallel.')
_ORIG_RECOMPUTE_STEPS = flags.DEFINE_integer(
  'orig_recompute_steps', 256, 'Steps of Net2NetTransformer.sample to time (0: skip).'
)
_ONLY = flags.DEFINE_list(
  'only', ['train', 'sample'], 'Which benchmarks to run: train, sample and/or dots (the bound).'
)
_OUT = flags.DEFINE_string(
  'out',
  'bench_stage2_cpu.jsonl',
  'Results file under experiments/results/ (or a path) the rows are appended to, with where they '
  'ran (machine.write_row); empty: print only.',
)

N_CODES, GRID, N_LAYER, N_HEAD, N_EMBD = 512, 16, 8, 8, 512
TOP_K, TEMPERATURE = 100, 1.0


def bench_config(dtype, scan_layers=True):
  c = config_base.stage2_base()
  c.stage1_config.update(n_embed=N_CODES, ch_mult=(1, 1, 2, 2, 4))  # f16: 256 px -> 16x16
  c.data.image_size = 256
  c.cond.kind = 'unconditional'
  c.transformer.update(
    n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, shared_vocab=False, scan_layers=scan_layers
  )
  c.train.update(batch_size=_BATCH.value, dtype=dtype)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def _interleaved(fns, iters, warmup):
  """Median and best seconds of each callable, timed in alternation (A, B, A, B, ...) so that
  ours and the original see the same machine load."""
  for fn in fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in fns]
  for _ in range(iters):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
  return [(statistics.median(ts), min(ts)) for ts in times]


def train_flops(layout, batch):
  """(matmul params, FLOPs per step): 6 N per token, plus attention's QK^T and AV."""
  c, t, v = N_EMBD, layout.seq_len, layout.vocab_size
  n_matmul = N_LAYER * 12 * c * c + c * v
  attn = 12 * N_LAYER * t * t * c * batch  # 2 matmuls x 2 FLOPs x 3 (fwd + bwd)
  return n_matmul, 6 * n_matmul * t * batch + attn


def ours_train(config, layout):
  """(one timed step, compile seconds, current params, the first step's loss)."""
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
  model = stage2_config.build_model(config, layout)
  state, step = stage2.fresh_train(config, model, layout, mesh)
  rng = np.random.RandomState(0)
  batch = {
    'codes': jnp.asarray(rng.randint(0, N_CODES, (_BATCH.value, layout.image_len)), jnp.int32),
    'label': jnp.zeros((_BATCH.value,), jnp.int32),
  }
  holder = {'state': state}
  t0 = time.perf_counter()
  holder['state'], m = step(holder['state'], {}, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0

  def once():
    holder['state'], metrics = step(holder['state'], {}, batch)
    jax.block_until_ready(metrics)

  return once, compile_s, lambda: holder['state']['params'], float(m['loss'])


def ours_sample(config, layout, params):
  """(one timed sampling of batch x 256 tokens, compile seconds)."""
  model = stage2_config.build_model(config, layout, scan_layers=False)
  from vqgan_jax.models import transformer as tf  # pylint: disable=g-import-not-at-top

  if config.transformer.scan_layers:
    params = tf.unstack_layers(params)
  cond = stage2.class_tokens(layout, np.zeros((_BATCH.value,), np.int32))
  key = jax.random.PRNGKey(0)
  run = lambda: jax.block_until_ready(
    sampling.sample(
      params, model, cond, key, steps=layout.image_len, temperature=TEMPERATURE, top_k=TOP_K
    )
  )
  t0 = time.perf_counter()
  run()
  compile_s = time.perf_counter() - t0
  return run, compile_s


# ----------------------------------------------------------------------------------------
# The original
# ----------------------------------------------------------------------------------------


def _reference_available():
  try:
    import taming  # noqa: F401
    import torch  # noqa: F401

    return True
  except ImportError:
    return False


def _original_optimizer(torch, gpt, lr):
  """taming's Net2NetTransformer.configure_optimizers: AdamW(0.9, 0.95), weight decay 0.01
  on Linear weights; none on biases, LayerNorm / Embedding weights and pos_emb."""
  decay, no_decay = set(), set()
  for mn, m in gpt.named_modules():
    for pn, _ in m.named_parameters(recurse=False):
      fpn = f'{mn}.{pn}' if mn else pn
      if pn.endswith('weight') and isinstance(m, torch.nn.Linear):
        decay.add(fpn)
      else:
        no_decay.add(fpn)
  params = dict(gpt.named_parameters())
  groups = [
    {'params': [params[n] for n in sorted(decay)], 'weight_decay': 0.01},
    {'params': [params[n] for n in sorted(no_decay)], 'weight_decay': 0.0},
  ]
  return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def original_train(layout, threads):
  """(one timed step of the original, its GPT)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,invalid-name

  from vqgan_jax.testing import reference  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  gpt = reference.build_gpt(layout.vocab_size, layout.block_size, N_LAYER, N_HEAD, N_EMBD)
  gpt.train()
  opt = _original_optimizer(torch, gpt, 4.5e-6 * _BATCH.value)
  g = torch.Generator().manual_seed(0)
  z = torch.randint(0, N_CODES, (_BATCH.value, layout.image_len), generator=g)
  c = torch.full((_BATCH.value, 1), layout.sos_id, dtype=torch.long)
  seq = torch.cat([c, z], dim=1)

  def once():
    logits, _ = gpt(seq[:, :-1])
    logits = logits[:, c.shape[1] - 1 :]  # Net2NetTransformer.forward: image positions only
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), z.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  return once, gpt


def _sample_with_past(torch, gpt, cond, steps, temperature, top_k, top_p):
  """scripts/sample_fast.py's loop over `forward_with_past` (see the module docstring)."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,invalid-name
  from transformers import top_k_top_p_filtering  # pylint: disable=g-import-not-at-top

  x, out, past, lc = cond, [], None, cond.shape[1]
  with torch.no_grad():
    for n in range(steps):
      logits, _, present = gpt.forward_with_past(x, past=past, past_length=n + lc - 1)
      past = [present] if past is None else past + [present]
      logits = logits[:, -1, :] / temperature
      logits = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
      x = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
      out.append(x)
  return torch.cat(out, dim=1)


def original_samplers(gpt, layout, threads):
  """(one sample_with_past run, one timed Net2NetTransformer.sample run or None, its steps)."""
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  gpt.eval()
  cond = torch.full((_BATCH.value, 1), layout.sos_id, dtype=torch.long)
  torch.manual_seed(0)
  with_past = lambda: _sample_with_past(torch, gpt, cond, layout.image_len, TEMPERATURE, TOP_K, 1.0)
  steps = min(_ORIG_RECOMPUTE_STEPS.value, layout.image_len)
  if not steps:
    return with_past, None, 0
  from taming.models.cond_transformer import Net2NetTransformer  # pylint: disable=g-import-not-at-top

  shim = types.SimpleNamespace(
    transformer=gpt,
    pkeep=1.0,
    top_k_logits=lambda logits, k: Net2NetTransformer.top_k_logits(None, logits, k),
  )
  x = torch.zeros((_BATCH.value, 0), dtype=torch.long)
  recompute = lambda: Net2NetTransformer.sample(
    shim, x, cond, steps, temperature=TEMPERATURE, sample=True, top_k=TOP_K
  )
  return with_past, recompute, steps


def _best_s(fn, *args, reps=5, inner=20):
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / inner)
  return best


def sample_dots(dtype, vocab):
  """(seconds of one decode step's weight dots, seconds of one streaming read of the same
  weights, their bytes): see stage2_sample_dots in the module docstring."""
  rng = np.random.RandomState(0)
  c = N_EMBD
  shapes = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)] * N_LAYER + [(c, vocab)]
  weights = [jnp.asarray(0.02 * rng.randn(*s), dtype) for s in shapes]

  def dot(h, w):  # as mixed_einsum computes: operands in `dtype`, float32 accumulation
    return jnp.dot(h.astype(dtype), w, preferred_element_type=jnp.float32)

  @jax.jit
  def chain(x, weights):
    for l in range(N_LAYER):
      qkv, proj, fc, fc_proj = weights[4 * l : 4 * l + 4]
      x = x + dot(dot(x, qkv)[:, :c], proj)
      x = x + dot(jax.nn.gelu(dot(x, fc)), fc_proj)
    return dot(x, weights[-1])

  stream = jax.jit(lambda weights: sum(w.astype(jnp.float32).sum() for w in weights))
  x = jnp.asarray(rng.randn(_BATCH.value, c), jnp.float32)
  nbytes = sum(w.nbytes for w in weights)
  return _best_s(chain, x, weights), _best_s(stream, weights), nbytes


def main(argv):
  del argv
  if set(_ONLY.value) - {'train', 'sample', 'dots'}:
    raise app.UsageError(f'--only: train, sample and/or dots, got {_ONLY.value}')
  use_ref = not _NO_REF.value and _reference_available()
  dtypes = list(_DTYPES.value)
  layouts = list(_LAYOUTS.value)
  if not layouts or set(layouts) - {'scan', 'unrolled'}:
    raise app.UsageError(f"--layouts: 'scan' and/or 'unrolled', got {layouts}")
  # (dtype, layout) pairs; the sampler runs on the first layout's trained parameters.
  pairs = [(d, lay) for d in dtypes for lay in layouts]
  configs = {
    (d, lay): stage2_config.resolve_config(bench_config(d, scan_layers=lay == 'scan'))
    for d, lay in pairs
  }
  layout = stage2_config.make_layout(configs[pairs[0]])
  assert (layout.vocab_size, layout.seq_len, layout.image_len) == (513, 256, 256)
  b = _BATCH.value
  common = {
    'batch': b,
    'seq_len': layout.seq_len,
    'n_layer': N_LAYER,
    'n_head': N_HEAD,
    'n_embd': N_EMBD,
    'vocab': layout.vocab_size,
    'device': jax.devices()[0].device_kind,
    'threads_original': _THREADS.value,
  }

  def emit(row):
    row['load_avg_1m'] = os.getloadavg()[0]
    row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
    machine.write_row(_OUT.value, row)

  iters, warmup = _ITERS.value, _WARMUP.value
  # Same seed and batch for every dtype and layout: the first step's loss compares them.
  trains = {}
  if {'train', 'sample'} & set(_ONLY.value):
    trains = {p: ours_train(configs[p], layout) for p in pairs}
  n_matmul, flops = train_flops(layout, b)
  gpt = None
  if 'train' in _ONLY.value:
    fns = [trains[p][0] for p in pairs]
    if use_ref:
      orig_once, gpt = original_train(layout, _THREADS.value)
      fns.append(orig_once)
    timed = _interleaved(fns, iters, warmup)
    loss0 = trains[pairs[0]][3]
    for i, (d, lay) in enumerate(pairs):
      step_s, best_s = timed[i]
      row = {
        'name': 'stage2_train_step',
        'dtype': d,
        'scan_layers': lay == 'scan',
        **common,
        'tokens_per_s': b * layout.seq_len / step_s,
        'tokens_per_s_best': b * layout.seq_len / best_s,
        'step_ms': 1e3 * step_s,
        'compile_s': trains[d, lay][1],
        'gflops_per_s': flops / step_s / 1e9,
        'matmul_params': n_matmul,
        'gflop_per_step': flops / 1e9,
        'first_loss': trains[d, lay][3],
        f'first_loss_rel_diff_vs_{pairs[0][0]}_{pairs[0][1]}': abs(trains[d, lay][3] - loss0)
        / abs(loss0),
      }
      if use_ref:
        orig_s, orig_best = timed[-1]
        row.update(
          original_tokens_per_s=b * layout.seq_len / orig_s,
          original_tokens_per_s_best=b * layout.seq_len / orig_best,
          original_gflops_per_s=flops / orig_s / 1e9,
          ratio_vs_original=orig_s / step_s,
        )
      emit(row)
  if 'dots' in _ONLY.value:
    for d in dtypes:
      dots_s, stream_s, nbytes = sample_dots(jnp.dtype(d), layout.vocab_size)
      emit(
        {
          'name': 'stage2_sample_dots',
          'dtype': d,
          **common,
          'weight_mb': nbytes / 1e6,
          'dots_ms': 1e3 * dots_s,
          'dots_gb_per_s': nbytes / dots_s / 1e9,
          'stream_ms': 1e3 * stream_s,
          'stream_gb_per_s': nbytes / stream_s / 1e9,
        }
      )
  if 'sample' in _ONLY.value:
    samplers = {
      d: ours_sample(configs[d, layouts[0]], layout, trains[d, layouts[0]][2]()) for d in dtypes
    }
    fns, steps = [samplers[d][0] for d in dtypes], 0
    if use_ref:
      if gpt is None:
        from vqgan_jax.testing import reference  # pylint: disable=g-import-not-at-top

        gpt = reference.build_gpt(layout.vocab_size, layout.block_size, N_LAYER, N_HEAD, N_EMBD)
      with_past, recompute, steps = original_samplers(gpt, layout, _THREADS.value)
      fns.append(with_past)
    # The original samplers take seconds to minutes per run: fewer repetitions.
    timed = _interleaved(fns, max(1, iters // 2), min(warmup, 1))
    for i, d in enumerate(dtypes):
      sample_s, sample_best = timed[i]
      ours = b * layout.image_len / sample_s
      row = {
        'name': 'stage2_sample',
        'dtype': d,
        **common,
        'top_k': TOP_K,
        'temperature': TEMPERATURE,
        'steps': layout.image_len,
        'tokens_per_s': ours,
        'tokens_per_s_best': b * layout.image_len / sample_best,
        # One decode step (all b sequences, one token each): what a sampler regression moves.
        'step_ms': 1e3 * sample_s / layout.image_len,
        'compile_s': samplers[d][1],
      }
      if use_ref:
        orig_s, orig_best = timed[-1]
        row['original_step_ms'] = 1e3 * orig_s / layout.image_len
        orig = b * layout.image_len / orig_s
        row.update(
          original='sample_with_past (scripts/sample_fast.py loop)',
          original_tokens_per_s=orig,
          original_tokens_per_s_best=b * layout.image_len / orig_best,
          ratio_vs_original=ours / orig,
        )
      emit(row)
    if use_ref and recompute is not None:
      fns = [samplers[d][0] for d in dtypes] + [recompute]
      timed = _interleaved(fns, 1, 0)
      orig = b * steps / timed[-1][0]
      for i, d in enumerate(dtypes):
        ours = b * layout.image_len / timed[i][0]
        emit(
          {
            'name': 'stage2_sample_recompute',
            'dtype': d,
            **common,
            'top_k': TOP_K,
            'temperature': TEMPERATURE,
            'steps': layout.image_len,
            'tokens_per_s': ours,
            'original': 'Net2NetTransformer.sample (reruns the prefix)',
            'original_steps': steps,
            'original_tokens_per_s': orig,
            'ratio_vs_original': ours / orig,
          }
        )


if __name__ == '__main__':
  app.run(main)
