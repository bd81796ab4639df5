"""config.train.dtype='auto': the compute dtype measured faster for a stage on this kind of
machine (parameters, optimizer state and losses stay float32 either way).

Accelerators compute bfloat16 natively: 'auto' is bfloat16 there. On CPUs the answer differs
by stage and by CPU kind, so it comes from a table of what was measured on each kind
(`experiments/bench_stage1.py` and `bench_stage2.py` rows under `experiments/results/`;
`experiments/README.md`, "dtype per CPU kind"). A kind nobody has measured computes float32,
the dtype every parity test checks.
"""

import jax

from vqgan_jax.kernels import tune

STAGES = ('vqgan', 'transformer')
# CPU kind -> {stage: the faster dtype measured there}.
#   avx512_bf16 (2-core AVX-512 VM with BF16/AMX, 2026-12-07, idle rows): the VQGAN step
#     bf16 30.7 vs float32 35.8 images/s (conv_impl tuned: 32.5 vs 35.9): XLA's bf16 convs do
#     not use the bf16 units; the GPT train step 1075 vs 785 tokens/s, its KV-cached sampler
#     676-1020 vs 504-659. Without AMX (2-core AMD EPYC Zen 4 VM, 2026-12-07) the same
#     answers: the VQGAN step bf16 34.7 vs float32 43.2 (tuned 41.4 vs 44.3), the GPT train
#     step 1235 vs 839 (unrolled 1482 vs 931), its sampler 915 vs 796.
#   avx2 (2-core AVX2 VM, 2026-11): the VQGAN step bf16 1.23x vs float32 1.60x the original's;
#     the GPT train step 750-920 vs 660-700 tokens/s, its sampler 720-820 vs 620-720.
CPU_TABLE = {
  'avx512_bf16': {'vqgan': 'float32', 'transformer': 'bfloat16'},
  'avx2': {'vqgan': 'float32', 'transformer': 'bfloat16'},
}


def cpu_kind(flags) -> str:
  """The CPU_TABLE row of a CPU with these flags ('avx' when none applies)."""
  flags = set(flags)
  if flags & {'avx512_bf16', 'amx_bf16'}:
    return 'avx512_bf16'
  if 'avx2' in flags:
    return 'avx2'
  return 'avx'


def resolve(dtype: str, stage: str, platform: str | None = None, flags=None) -> str:
  """`dtype` itself, or for 'auto' the measured faster one of `stage` ('vqgan' or
  'transformer') on `platform` (default: JAX's backend) with these CPU flags (default: this
  machine's)."""
  if dtype != 'auto':
    return dtype
  if stage not in STAGES:
    raise ValueError(f'stage must be one of {STAGES}, got {stage!r}')
  platform = platform or jax.default_backend()
  if platform != 'cpu':
    return 'bfloat16'
  kind = cpu_kind(tune.cpu_flags() if flags is None else flags)
  return CPU_TABLE.get(kind, {}).get(stage, 'float32')
