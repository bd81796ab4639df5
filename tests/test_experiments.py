"""The experiment scripts write their result rows through one writer that says where each row
was measured (experiments/machine.py): no benchmark runs here, the scripts are read (ast)."""

import ast
import glob
import importlib.util
import json
import os
import subprocess
import sys

from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, 'experiments')
MACHINE_FIELDS = (
  'date',
  'commit',
  'cpu_model',
  'cpu_flags',
  'cores',
  'jax',
  'jaxlib',
  'torch',
  'malloc',
)


def _machine():
  spec = importlib.util.spec_from_file_location('machine', os.path.join(EXPERIMENTS, 'machine.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _script(name):
  """experiments/<name>.py as a module, for its functions. Its absl flags are removed from the
  process's flags again, so scripts that define the same flag names load side by side."""
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, EXPERIMENTS)  # their `import machine`
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(EXPERIMENTS)
    for flag in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, flag)
  return module


def _writes_results(tree):
  """Whether a script names a results file (a '.jsonl' or 'results' string)."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      if node.value.endswith('.jsonl') or node.value == 'results':
        return True
  return False


def _calls(tree, name):
  return [
    n
    for n in ast.walk(tree)
    if isinstance(n, ast.Call)
    and isinstance(n.func, ast.Attribute)
    and n.func.attr == name
    or isinstance(n, ast.Call)
    and isinstance(n.func, ast.Name)
    and n.func.id == name
  ]


def test_every_script_that_writes_results_uses_the_row_writer():
  scripts = sorted(glob.glob(os.path.join(EXPERIMENTS, '*.py')))
  writers = []
  for path in scripts:
    if os.path.basename(path) == 'machine.py':
      continue
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    name = os.path.relpath(path, REPO)
    # Rows reach a file only through machine.write_row: no script appends on its own (other
    # files, e.g. a converter's input written to a temporary folder, may be written).
    for call in _calls(tree, 'open'):
      modes = [a.value for a in call.args[1:2] if isinstance(a, ast.Constant)]
      modes += [k.value.value for k in call.keywords if k.arg == 'mode']
      assert not any('a' in str(m) for m in modes), f'{name}: open(..., {modes})'
    if _writes_results(tree):
      writes = [
        c
        for c in _calls(tree, 'write_row')
        if isinstance(c.func, ast.Attribute) and getattr(c.func.value, 'id', '') == 'machine'
      ]
      assert writes, f'{name} writes under experiments/results/ without machine.write_row'
      writers.append(name)
  # The scripts that measured the committed rows (a script that stops naming its results
  # file would drop out of the check above).
  assert {
    'experiments/ablate_stage1.py',
    'experiments/bench_stage1.py',
    'experiments/bench_stage2.py',
    'experiments/code_floor.py',
    'experiments/compare_generators.py',
    'experiments/convert_f16_roundtrip.py',
    'experiments/gpu_check.py',
    'experiments/guidance_sweep.py',
    'experiments/test_bounds.py',
  } <= set(writers), writers


def test_the_row_writer_adds_where_the_row_was_measured(tmp_path, capsys):
  machine = _machine()
  out = tmp_path / 'rows.jsonl'
  machine.write_row(str(out), {'name': 'a', 'value': 1.5})
  machine.write_row(str(out), {'name': 'b', 'commit': 'abc1234'}, echo=False)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['name'] for r in rows] == ['a', 'b'] and rows[0]['value'] == 1.5
  for row in rows:
    assert set(MACHINE_FIELDS) <= set(row), row
    assert isinstance(row['cpu_flags'], list) and row['cores'] >= 1
  assert rows[1]['commit'] == 'abc1234'  # the row's own commit (when its run started) wins
  assert {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'} <= set(machine.CPU_FLAGS)
  assert json.loads(capsys.readouterr().out) == rows[0]  # printed once, the row as written
  machine.write_row('', {'name': 'c'})  # print only
  assert json.loads(capsys.readouterr().out)['name'] == 'c'


def test_gpu_check_runs_tiny_on_cpu(tmp_path):
  """experiments/gpu_check.py --tiny: every part runs (the project's own steps and samplers, at
  toy shapes) and writes its rows with the fields the first GPU run will report."""
  out = tmp_path / 'gpu_check.jsonl'
  cmd = [sys.executable, os.path.join(EXPERIMENTS, 'gpu_check.py'), '--tiny', f'--out={out}']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r['name']: r for r in map(json.loads, out.read_text().splitlines())}
  assert set(rows) == {'gpu_stage1_train', 'gpu_gpt_train', 'gpu_gpt_sample', 'gpu_maskgit_sample'}
  for row in rows.values():
    assert set(MACHINE_FIELDS) <= set(row) and row['tiny'] is True
    assert row['device_kind'] == 'cpu' and row['platform'] == 'cpu'
    assert 'mfu' not in row and row['peak_bf16_tflops'] is None  # no peak known for a CPU
  s1, gpt = rows['gpu_stage1_train'], rows['gpu_gpt_train']
  assert s1['images_per_s'] > 0 and s1['step_tflop'] > 0 and s1['dtype'] == 'bfloat16'
  assert gpt['tokens_per_s'] > 0 and gpt['step_tflop'] > 0 and gpt['batch'] == 4
  for kind in ('gpt', 'maskgit'):
    row = rows[f'gpu_{kind}_sample']
    assert row['batch_1']['latency_s'] > 0 and row['batch_64']['latency_s'] > 0
  assert rows['gpu_gpt_sample']['batch_64']['tokens_per_s'] > 0
  assert rows['gpu_maskgit_sample']['iterations'] == 8
  assert rows['gpu_maskgit_sample']['batch_1']['speedup_vs_gpt'] > 0


def test_gpu_check_peak_table_and_flop_count():
  gpu_check = _script('gpu_check')
  assert gpu_check.peak_flops('NVIDIA H100 80GB HBM3') == 989e12  # SXM
  assert gpu_check.peak_flops('NVIDIA H200') == 989e12
  assert gpu_check.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert gpu_check.peak_flops('cpu') is None

  class Compiled:  # cost_analysis() is a dict in new jax, a list of one dict in older ones
    def __init__(self, cost):
      self.cost = cost

    def cost_analysis(self):
      return self.cost

  assert gpu_check.step_flops(Compiled({'flops': 2.0})) == 2.0
  assert gpu_check.step_flops(Compiled([{'flops': 3.0}])) == 3.0
  assert gpu_check.step_flops(Compiled(None)) == 0.0


def test_the_guidance_rule_picks_the_lowest_fd_at_90_percent_else_the_most_accurate_near_it():
  sweep = _script('guidance_sweep')

  def row(scale, fd, acc):
    return {'cfg_scale': scale, 'fd_fmnist': fd, 'class_accuracy': acc}

  rows = [row(1, 2.8, 0.80), row(2, 1.9, 0.91), row(3, 2.2, 0.95), row(4, 1.5, 0.88)]
  assert sweep.pick(rows)['cfg_scale'] == 2  # 1.5 is lower but below 90%
  # None reaches 90%: the best fd is 1.5; within 10% of it (<= 1.65) the most accurate.
  rows = [row(1, 2.8, 0.80), row(2, 1.6, 0.86), row(3, 1.5, 0.84), row(4, 1.7, 0.89)]
  assert sweep.pick(rows)['cfg_scale'] == 2
  try:
    sweep.pick([])
  except ValueError as e:
    assert 'no sweep rows' in str(e)
  else:
    raise AssertionError('pick([]) must refuse')
