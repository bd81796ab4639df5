"""Which malloc this process runs on: XLA:CPU allocates each step's temporaries afresh, and with
glibc's malloc the large ones are mapped and unmapped every step. Preloading TCMalloc
(`scripts/malloc.sh`, which the README's scripts source) made the benchmark GPT's bf16 train
step 847 against 1185 ms (2-core AVX-512 VM, experiments/results/bench_stage2_cpu.jsonl).
Result rows record it (experiments/machine.py), and a CPU run on glibc says how to get it
(main.py)."""

_LIBRARIES = (('libtcmalloc', 'tcmalloc'), ('libjemalloc', 'jemalloc'), ('libmimalloc', 'mimalloc'))

HINT = (
  'XLA:CPU runs on glibc malloc here: preloading TCMalloc makes CPU steps up to 25% faster '
  '(Debian: apt install libtcmalloc-minimal4; scripts/malloc.sh preloads it)'
)


def name(maps_path: str = '/proc/self/maps') -> str:
  """'tcmalloc', 'jemalloc' or 'mimalloc' when that library is mapped into the process, else
  'glibc'; 'unknown' where the process's maps cannot be read (not Linux)."""
  try:
    with open(maps_path) as f:
      maps = f.read()
  except OSError:
    return 'unknown'
  for library, label in _LIBRARIES:
    if library in maps:
      return label
  return 'glibc'
