"""The layers contract: every import inside `vqgan_jax` points down (or across) the table below.

Nothing but the entry points and the trainers imports `train/`; the model families own their
construction, shardings and loading, so the loaders, the modes and the converter build on them
and not on the trainers. Both module-level and function-level imports count.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'vqgan_jax')

# Lowest first. A module may import its own layer or a lower one. A name maps to the layer of
# its longest listed prefix; a package's own file is 'pkg.__init__' ('__init__': vqgan_jax's).
LAYERS = (
  # Foundation: no model knowledge.
  ('kernels', 'config_base', 'distributed', 'checks', 'images', 'metrics', 'losses', 'malloc'),
  # The saved config's schema and identity check; the params digest; orbax's workarounds;
  # the data iterators' states.
  ('run_config', 'fingerprint', 'orbax_workarounds', 'iterator_state'),
  # File formats: the converter's error and its safe PyTorch-file reader, which loaders share.
  ('workdir_lock', 'convert.__init__', 'convert.torch_ckpt'),
  # Model families with their config construction, shardings and load(); what loading needs.
  ('models', 'validate', 'parallel', 'checkpoints'),
  # Data, samplers, feature networks' metrics, the eval steps.
  (
    'data',
    'sampling',
    'maskgit_sampling',
    'completion',
    'fid',
    'classifier_features',
    'feature_nets',
    'stage1_eval',
  ),
  # The public loaders and the modes.
  ('inference', 'evaluate', 'sample', 'encode', 'convert'),
  ('train',),
  # Entry points (and the test support, which nothing in the package imports). The taming
  # converter writes a resumable stage-1 run, so it builds the trainer's state
  # (`train.stage1.init_state`); `python -m vqgan_jax.convert` is its entry point.
  ('main', 'plan', 'testing', '__init__', 'convert.taming', 'convert.__main__'),
)


def _layer(module):
  """Layer index of a dotted module name relative to the package (e.g. 'train.stage1')."""
  best, index = None, None
  for i, names in enumerate(LAYERS):
    for name in names:
      if module == name or module.startswith(name + '.'):
        if best is None or len(name) > len(best):
          best, index = name, i
  return index


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith('.py'):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, PACKAGE)[: -len('.py')].replace(os.sep, '.')
        yield path, rel


def _imports(path, module):
  """(line, imported module relative to the package) of each vqgan_jax import in a file."""
  tree = ast.parse(open(path, encoding='utf-8').read(), path)
  package = module.rpartition('.')[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: resolve against the package
        parts = ('vqgan_jax.' + package).rstrip('.').split('.')
        parts = parts[: len(parts) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      # `from vqgan_jax.train import stage1` imports the submodule stage1.
      names = [f'{base}.{a.name}' for a in node.names] if base else []
      names = names or [base]
    else:
      continue
    for name in names:
      if name == 'vqgan_jax' or name.startswith('vqgan_jax.'):
        yield node.lineno, name.removeprefix('vqgan_jax').lstrip('.')


def _resolve(name):
  """The module a `from X import Y` name refers to: X.Y when that is a module, else X."""
  parts = name.split('.') if name else []
  while parts:
    path = os.path.join(PACKAGE, *parts)
    if os.path.isdir(path):
      return '.'.join(parts + ['__init__'])
    if os.path.isfile(path + '.py'):
      return '.'.join(parts)
    parts.pop()
  return '__init__'


def violations():
  out = []
  for path, module in _modules():
    mine = _layer(module)
    assert mine is not None, f'{module}: not in LAYERS; add it'
    for line, name in _imports(path, module):
      imported = _resolve(name)
      theirs = _layer(imported)
      if theirs > mine:
        rel = os.path.relpath(path, REPO)
        out.append(f'{rel}:{line}: {module} -> {imported}')
  return out


def test_imports_point_down():
  bad = violations()
  assert not bad, 'imports of a higher layer (see LAYERS in this file):\n' + '\n'.join(bad)


def test_function_level_imports_count():
  # plan imports train/ inside its functions only; the check must see those imports too.
  found = {name for _, name in _imports(os.path.join(PACKAGE, 'plan.py'), 'plan')}
  assert 'train.stage1' in found and _layer('plan') > _layer('train.stage1')
