"""How close each numerical bound of the suite comes to failing, on every CPU kind XLA can
emulate on this machine.

  python experiments/test_bounds.py [--isa=native,AVX2,AVX] [--workers=2] [test files...]

Runs the numerical test files once per instruction set (`XLA_FLAGS=--xla_cpu_max_isa=ISA`
makes XLA:CPU generate code for an older CPU on a newer one; torch's oneDNN is left as it
is) with $VQGAN_JAX_BOUNDS_LOG set, so every `np.testing.assert_allclose` and every
`bounds.check` of the suite records measured / bound (tests/bounds.py). Appends one row per
ISA to experiments/results/test_bounds_cpu.jsonl (pass/fail counts, the worst ratio per
bound, the machine) and prints one JSON line per bound whose worst ratio reaches --show, worst
first. `--table=N` prints the N bounds closest to failing from the rows already written.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'experiments', 'results', 'test_bounds_cpu.jsonl')

# Every test file that compares numbers against a tolerance (the end-to-end files that only
# check exit codes, files and messages are left out).
NUMERICAL = (
  'tests/test_train.py',
  'tests/test_models.py',
  'tests/test_kernels.py',
  'tests/test_quantizers.py',
  'tests/test_losses.py',
  'tests/test_lpips.py',
  'tests/test_metrics.py',
  'tests/test_transformer.py',
  'tests/test_sampling.py',
  'tests/test_maskgit.py',
  'tests/test_bf16.py',
  'tests/test_remat.py',
  'tests/test_stage2.py',
  'tests/test_eval.py',
  'tests/test_parity_stage1.py',
  'tests/test_parity_stage2.py',
  'tests/test_parity_gumbel.py',
  'tests/test_fid_inception.py',
  'tests/test_reference_harness.py',
  'tests/test_convert.py',
  'tests/test_multihost.py',
)


def run(isa: str, files, workers: int) -> dict:
  env = dict(os.environ)
  if isa != 'native':
    env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} --xla_cpu_max_isa={isa}'.strip()
  with tempfile.TemporaryDirectory() as tmp:
    log = os.path.join(tmp, 'bounds.jsonl')
    env['VQGAN_JAX_BOUNDS_LOG'] = log
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *files]
    if workers > 1:
      cmd += ['-n', str(workers), '--dist', 'loadfile']
    start = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    worst = {}
    if os.path.exists(log):
      with open(log) as f:
        for line in f:
          r = json.loads(line)
          if r['site'] not in worst or r['ratio'] > worst[r['site']]['ratio']:
            worst[r['site']] = {'ratio': r['ratio'], 'test': r['test'], 'name': r['name']}
  counts = {
    k: int(n) for n, k in re.findall(r'(\d+) (passed|failed|skipped|errors?)\b', out.stdout)
  }
  return {
    'isa': isa,
    'files': list(files),
    'exit_status': out.returncode,
    'passed': counts.get('passed', 0),
    'failed': counts.get('failed', 0) + counts.get('error', 0) + counts.get('errors', 0),
    'skipped': counts.get('skipped', 0),
    'failures': re.findall(r'^(?:FAILED|ERROR) (\S+)', out.stdout, re.M),
    'seconds': round(seconds, 1),
    'bounds': dict(sorted(worst.items())),
  }


def table(top: int) -> str:
  """A Markdown table of the `top` bounds closest to failing, from the newest row of each
  test file and ISA in RESULTS (a later run of some files replaces only their bounds)."""
  newest = {}
  with open(RESULTS) as f:
    for line in f:
      row = json.loads(line)
      for file in row['files']:
        newest[(file, row['isa'])] = row
  per_site = collections.defaultdict(dict)
  for (file, isa), row in newest.items():
    for site, b in row['bounds'].items():
      if site.split(':')[0] == file:
        per_site[site][isa] = b
  isas = sorted({isa for _, isa in newest}, key=lambda i: (i != 'native', i))
  lines = [
    '| bound | test | ' + ' | '.join(isas) + ' |',
    '|---|---|' + '---|' * len(isas),
  ]
  ranked = sorted(per_site.items(), key=lambda kv: -max(b['ratio'] for b in kv[1].values()))
  for site, per in ranked[:top]:
    test = max(per.values(), key=lambda b: b['ratio'])['test'].split('::')[-1]
    ratios = [f'{per[i]["ratio"]:.3f}' if i in per else '-' for i in isas]
    lines.append(f'| `{site}` | {test} | ' + ' | '.join(ratios) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('files', nargs='*', default=NUMERICAL)
  parser.add_argument('--isa', default='native,AVX2,AVX')
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--show', type=float, default=0.1, help='print bounds reaching this ratio')
  parser.add_argument('--table', type=int, default=0, help='print the N closest bounds, run none')
  args = parser.parse_args()
  if args.table:
    print(table(args.table))
    return
  rows = []
  for isa in args.isa.split(','):
    row = machine.write_row(
      RESULTS, {'name': 'test_bounds', **run(isa, args.files, args.workers)}, echo=False
    )
    rows.append(row)
    summary = {k: row[k] for k in ('isa', 'passed', 'failed', 'skipped', 'failures', 'seconds')}
    print(json.dumps({'run': summary, 'bounds_recorded': len(row['bounds'])}), flush=True)
  by_site = collections.defaultdict(dict)
  for row in rows:
    for site, b in row['bounds'].items():
      by_site[site][row['isa']] = b
  ranked = sorted(by_site.items(), key=lambda kv: -max(b['ratio'] for b in kv[1].values()))
  for site, per_isa in ranked:
    top = max(per_isa.values(), key=lambda b: b['ratio'])
    if top['ratio'] >= args.show:
      ratios = {isa: round(b['ratio'], 4) for isa, b in per_isa.items()}
      print(json.dumps({'site': site, 'worst': ratios, 'test': top['test'], 'name': top['name']}))
  sys.exit(max(row['exit_status'] for row in rows))


if __name__ == '__main__':
  main()
