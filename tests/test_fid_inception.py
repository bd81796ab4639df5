"""The FID Inception against pytorch-fid 0.3.0, the Fréchet distance against its
`calculate_frechet_distance`, statistics files, Inception Score, weights loading.

Parity runs pytorch-fid's own code on random weights (no download: its URL loader is
monkeypatched to read our temp `.pth`); relative errors are max |ours - torch| / max |torch|
over the whole batch (the max norm).
"""

import importlib
import importlib.util
import os
import subprocess
import sys
import types

import bounds
import jax
import numpy as np
import pytest

from vqgan_jax import fid
from vqgan_jax import parallel
from vqgan_jax.convert import ConversionError
from vqgan_jax.convert import __main__ as convert_main
from vqgan_jax.convert.torch_ckpt import INSTALL_HINT
from vqgan_jax.models import inception as inc
from vqgan_jax.models import inception_load as conv
from vqgan_jax.validate import ConfigError

# As the other parity tests (tests/parity.py): without the [reference] extra the tests that
# need torch or pytorch-fid skip with the install hint; the rest of the module runs.
HINT = f'pytorch-fid and torch are not installed: {INSTALL_HINT}'


def _torch():
  """torch, or a skip with the install hint."""
  return pytest.importorskip('torch', reason=HINT)


def _rel(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _is_torchvision(name):
  return name == 'torchvision' or name.startswith('torchvision.')


def _import_pytorch_fid():
  """(pytorch_fid.inception, pytorch_fid.fid_score), on the real torchvision's Python code.

  The torchvision wheel paired with the CPU torch 2.13 is a CUDA build whose package
  `__init__` fails (its compiled ops do not load), but the Inception blocks pytorch-fid
  subclasses are plain Python: when `import torchvision` fails, the package is registered
  without running its `__init__` and its submodules import from the installed files.
  sys.modules' torchvision entries are restored afterwards, so LPIPS's stand-in (reference
  harness) still sees the state it expects; pytorch-fid keeps its own references.
  """
  if 'pytorch_fid.fid_score' in sys.modules:
    return sys.modules['pytorch_fid.inception'], sys.modules['pytorch_fid.fid_score']
  _torch()  # before torchvision's modules
  if importlib.util.find_spec('pytorch_fid') is None:
    pytest.skip(HINT)

  saved = {n: m for n, m in sys.modules.items() if _is_torchvision(n)}
  try:
    for n in saved:
      del sys.modules[n]
    try:
      import torchvision  # noqa: F401
    except Exception:  # RuntimeError of the CUDA build on a CPU torch
      for n in [n for n in sys.modules if _is_torchvision(n)]:
        del sys.modules[n]
      spec = importlib.util.find_spec('torchvision')
      if spec is None:  # reference-constraints.txt calls it optional (for LPIPS)
        msg = "pytorch-fid subclasses torchvision's Inception: pip install torchvision==0.28.0"
        raise ImportError(msg) from None
      pkg = types.ModuleType('torchvision')
      pkg.__spec__, pkg.__path__ = spec, list(spec.submodule_search_locations)
      sys.modules['torchvision'] = pkg
      pkg.__version__ = importlib.import_module('torchvision.version').__version__
    pfi = importlib.import_module('pytorch_fid.inception')
    pfs = importlib.import_module('pytorch_fid.fid_score')
  finally:
    for n in [n for n in sys.modules if _is_torchvision(n)]:
      del sys.modules[n]
    sys.modules.update(saved)
  return pfi, pfs


def _random_state_dict(seed=0):
  """A state dict with pytorch-fid's keys (num_batches_tracked too, as torch saves it) and
  random values scaled so activations stay O(1) through the 94 conv + BN layers, with
  non-trivial BN statistics."""
  import torch

  rng = np.random.default_rng(seed)
  sd = {}
  for k, s in conv.torch_shapes().items():
    if k.endswith('conv.weight'):
      v = rng.standard_normal(s, np.float32) * np.sqrt(2.0 / np.prod(s[1:]))
    elif k.endswith('running_var'):
      v = rng.uniform(0.5, 2.0, s)
    elif k.endswith('bn.weight'):
      v = rng.uniform(0.5, 1.5, s)
    elif k == 'fc.weight':
      v = rng.standard_normal(s) / np.sqrt(s[1])
    else:  # bn.bias, running_mean, fc.bias
      v = 0.1 * rng.standard_normal(s)
    sd[k] = torch.from_numpy(v.astype(np.float32))
    if k.endswith('running_var'):
      sd[k.replace('running_var', 'num_batches_tracked')] = torch.tensor(7)
  return sd


@pytest.fixture(scope='module')
def torch_fid(tmp_path_factory):
  """pytorch-fid's InceptionV3([3], resize_input=True, normalize_input=True) on random
  weights read from a temp .pth, its inner `fid_inception_v3` (for `fc`), and the file."""
  torch = _torch()

  pfi, _ = _import_pytorch_fid()
  pth = str(tmp_path_factory.mktemp('inception') / 'pt_inception-random.pth')
  torch.save(_random_state_dict(), pth)
  inner = []

  def fid_inception_v3():
    inner.append(orig())
    return inner[-1]

  orig = pfi.fid_inception_v3
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pfi, 'load_state_dict_from_url', lambda *a, **k: torch.load(pth))
    mp.setattr(pfi, 'fid_inception_v3', fid_inception_v3)
    model = pfi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
  return model, inner[0].eval(), pth


@pytest.fixture(scope='module')
def images():
  """2 RGB images 40x56 in [-1, 1], noise and a smooth colour pattern (upsampled to 299 on
  the way in; the resize test covers shrinking)."""
  noise = np.random.default_rng(1).uniform(-1, 1, (40, 56, 3))
  y, x = np.mgrid[:40, :56]
  smooth = np.stack([np.sin(x / 5.0) * np.cos(y / 7.0), np.cos(x / 9.0), y / 20.0 - 1.0], -1)
  return np.stack([noise, smooth]).astype(np.float32)


@pytest.mark.reference
@pytest.mark.parametrize('hw', [(32, 32), (64, 48), (512, 377), (299, 299)])
def test_inception_resize_matches_torch_interpolate(hw):
  """Up- and downsampling (2 taps, no antialias) equal F.interpolate(bilinear,
  align_corners=False) to float32 round-off."""
  torch = _torch()
  F = torch.nn.functional

  x = np.random.default_rng(2).uniform(0, 1, (2, *hw, 3)).astype(np.float32)
  ours = inc.resize_bilinear_torch(x, (299, 299))
  ref = F.interpolate(
    torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode='bilinear', align_corners=False
  )
  err = np.max(np.abs(np.asarray(ours) - ref.permute(0, 2, 3, 1).numpy()))
  # Bit-equal weights where torch's kernel uses FMA (AVX2/AVX-512); elsewhere its source
  # positions round differently, by up to an ulp of the input size. A half-pixel shift or an
  # antialiased shrink would be off by ~0.1.
  assert err <= max(hw) * 2.0**-23, err


def test_inception_preprocess_gray_is_repeated_rgb():
  x = np.random.default_rng(3).uniform(-1, 1, (2, 20, 24, 1)).astype(np.float32)
  gray = np.asarray(inc.preprocess(x))
  assert gray.shape == (2, 299, 299, 3)
  np.testing.assert_array_equal(gray, np.asarray(inc.preprocess(np.repeat(x, 3, axis=-1))))
  with pytest.raises(ValueError, match='1 or 3 channels'):
    inc.preprocess(np.zeros((1, 8, 8, 4), np.float32))


@pytest.mark.reference
def test_inception_features_match_pytorch_fid(torch_fid, images, tmp_path):
  """pool3 and logits of our network (sharded over a 2-device mesh) equal pytorch-fid's on
  the same random weights; the .npz the CLI converts gives the same network."""
  import torch
  import torch.nn.functional as F

  model, inner, pth = torch_fid
  with torch.no_grad():
    x = torch.from_numpy((images + 1.0) / 2.0).permute(0, 3, 1, 2)  # [0, 1] NCHW
    pool = model(x)[0].flatten(1)
    logits = inner.fc(pool).numpy()
    unbiased = F.linear(pool, inner.fc.weight).numpy()
    pool = pool.numpy()
  # The random network is informative: the two images' features differ by far more than
  # the tolerance.
  assert _rel(pool[0], pool[1]) > 0.05

  mesh = parallel.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1}, jax.devices()[:2])
  ext = fid.load_inception(pth, mesh=mesh)
  assert (ext.name, ext.feature_dim) == ('pt_inception-2015-12-05', 2048)
  out = ext(images)
  assert out['features'].sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
  errs = {
    'features': _rel(out['features'], pool),
    'logits': _rel(out['logits'], logits),
    'logits_unbiased': _rel(out['logits_unbiased'], unbiased),
  }
  print('max-norm relative errors vs pytorch-fid:', errs)
  for name, err in errs.items():
    bounds.check(f'{name} vs pytorch-fid (max-norm relative)', err, 1e-4)
  with pytest.raises(ValueError, match='batch shards'):
    ext(images[:1])

  npz = str(tmp_path / 'inception.npz')
  assert convert_main.main(['inception', '--pth', pth, '--out', npz]) == 0
  # Same mesh, so XLA's compilation cache serves it (a plain jit is one more 8 s compile).
  again = fid.load_inception(npz, mesh=mesh)(images)['features']  # no torch on this path
  np.testing.assert_array_equal(np.asarray(again), np.asarray(out['features']))


@pytest.mark.reference
def test_inception_pth_and_npz_conversion(torch_fid, tmp_path):
  """The .npz holds exactly the .pth's arrays in flax layout; a file lacking keys, or not a
  .pth/.npz, fails with one sentence naming the file and the key; the CLI reports it."""
  import torch

  _, _, pth = torch_fid
  variables = conv.read_pth(pth)
  npz = str(tmp_path / 'w.npz')
  conv.save_npz(variables, npz)
  assert os.listdir(tmp_path) == ['w.npz']  # the temp file was renamed away
  back = conv.load_npz(npz)
  flat_a, flat_b = conv._flatten(variables), conv._flatten(back)
  assert flat_a.keys() == flat_b.keys() and len(flat_a) == 472
  assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
  sd = torch.load(pth)
  w = sd['Mixed_6b.branch7x7_2.conv.weight'].numpy()  # OIHW (c7, c7, 1, 7)
  np.testing.assert_array_equal(
    variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel'], w.transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'],
    sd['Mixed_7c.branch_pool.bn.running_var'].numpy(),
  )

  small = str(tmp_path / 'partial.pth')
  torch.save({'fc.bias': torch.zeros(1008)}, small)
  with pytest.raises(ConversionError, match=r'partial\.pth lacks \S+ \(and 470 more\): is it'):
    fid.load_inception(small)
  assert convert_main.main(['inception', '--pth', small, '--out', npz]) == 2
  with pytest.raises(ConversionError, match=r'\.pth .* or a \.npz'):
    conv.load(__file__)


def test_inception_state_dict_key_and_shape_errors():
  """Numpy state dicts (no torch): one missing, one extra, one misshapen key, each named."""
  shapes = conv.torch_shapes()
  assert len(shapes) == 472 and shapes['fc.weight'] == (1008, 2048)
  assert shapes['Mixed_7b.branch3x3_2b.conv.weight'] == (384, 384, 3, 1)
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  missing = {k: v for k, v in sd.items() if k != 'Mixed_5d.branch5x5_2.bn.running_var'}
  key = r'Mixed_5d\.branch5x5_2\.bn\.running_var'
  with pytest.raises(ConversionError, match=rf'^my\.pth lacks {key}: is it'):
    conv.state_dict_to_variables(missing, 'my.pth')
  with pytest.raises(ConversionError, match=r'holds AuxLogits\.fc\.weight, which'):
    conv.state_dict_to_variables({**sd, 'AuxLogits.fc.weight': np.zeros((1000, 768))}, 'my.pth')
  bad = {**sd, 'fc.bias': np.zeros((1000,), np.float32)}
  with pytest.raises(ConversionError, match=r'fc\.bias has shape \(1000,\), .* has \(1008,\)'):
    conv.state_dict_to_variables(bad, 'my.pth')


@pytest.mark.reference
def test_fid_matches_pytorch_fid_frechet_distance():
  """StatsAccumulator (batched, masked) gives numpy's mean/cov, and the Fréchet distance of
  two 128-d sets of 1500 samples (well-conditioned covariances, so scipy's sqrtm in
  pytorch-fid is accurate) equals calculate_frechet_distance."""
  _, pfs = _import_pytorch_fid()
  rng = np.random.default_rng(4)
  d, n = 128, 1500
  a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 2.0
  b = rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d) + rng.standard_normal(d)
  acc_a, acc_b = fid.StatsAccumulator(d), fid.StatsAccumulator(d)
  for i in range(0, n, 256):
    acc_a.add(a[i : i + 256].astype(np.float32))
    pad = np.concatenate([b[i : i + 256], np.zeros((7, d))])
    acc_b.add(pad, mask=np.arange(len(pad)) < len(pad) - 7)
  assert acc_a.count == acc_b.count == n
  a = a.astype(np.float32).astype(np.float64)  # what the accumulator saw
  mu_a, sigma_a = acc_a.mu_sigma()
  mu_b, sigma_b = acc_b.mu_sigma()
  np.testing.assert_allclose(mu_a, a.mean(0), rtol=0, atol=1e-12)
  np.testing.assert_allclose(sigma_a, np.cov(a, rowvar=False), rtol=0, atol=1e-11)
  np.testing.assert_allclose(sigma_b, np.cov(b, rowvar=False), rtol=0, atol=1e-11)
  ours = fid.fid_from_stats({'mu': mu_a, 'sigma': sigma_a}, {'mu': mu_b, 'sigma': sigma_b})
  cov = lambda x: np.cov(x, rowvar=False)
  ref = pfs.calculate_frechet_distance(a.mean(0), cov(a), b.mean(0), cov(b))
  print(f'Frechet distance: ours {ours!r}, pytorch-fid {ref!r}')
  assert ref > 1.0
  bounds.check('Frechet distance vs pytorch-fid (relative)', abs(ours - ref) / abs(ref), 1e-6)


def test_fid_stats_files_round_trip(tmp_path):
  """Our stats file round-trips, is pytorch-fid's format (plain `mu`/`sigma` readable), and
  pytorch-fid's own files (only mu, sigma) load with count/extractor None."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((50, 6))
  mu, sigma = x.mean(0), np.cov(x, rowvar=False)
  path = str(tmp_path / 'train_stats.npz')
  fid.save_stats(path, mu, sigma, 50, 'pt_inception-2015-12-05')
  assert os.listdir(tmp_path) == ['train_stats.npz']
  s = fid.load_stats(path)
  assert (s['count'], s['extractor']) == (50, 'pt_inception-2015-12-05')
  np.testing.assert_array_equal(s['mu'], mu)
  np.testing.assert_array_equal(s['sigma'], sigma)
  with np.load(path) as f:  # how pytorch-fid reads a stats file
    np.testing.assert_array_equal(f['sigma'][:], sigma)
  theirs = str(tmp_path / 'published.npz')
  np.savez(theirs, mu=mu + 1.0, sigma=sigma)
  t = fid.load_stats(theirs)
  assert t['count'] is None and t['extractor'] is None
  assert fid.fid_from_stats(s, t) == pytest.approx(6.0, rel=1e-9)  # |1|^2 * 6, same sigma
  other = {**t, 'extractor': 'fmnist_classifier'}
  with pytest.raises(ValueError, match='different feature extractors'):
    fid.fid_from_stats(s, other)
  np.savez(str(tmp_path / 'bad.npz'), mu=mu)
  with pytest.raises(ValueError, match='not the statistics'):
    fid.load_stats(str(tmp_path / 'bad.npz'))
  (tmp_path / 'text.npz').write_text('mu')
  with pytest.raises(ValueError, match=r'text\.npz is no readable statistics'):
    fid.load_stats(str(tmp_path / 'text.npz'))
  with pytest.raises(FileNotFoundError):  # eval computes the statistics then
    fid.load_stats(str(tmp_path / 'absent.npz'))


def test_fid_inception_score():
  """The TF reference formula (split means, population std); uniform logits score 1, sure
  predictions spread evenly over k classes score k."""
  assert fid.inception_score(np.zeros((20, 1008)), splits=2) == pytest.approx((1.0, 0.0))
  sure = np.full((40, 1008), -50.0)
  sure[np.arange(40), np.arange(40) % 5] = 50.0  # each split of 10: 5 classes twice
  assert fid.inception_score(sure, splits=4) == pytest.approx((5.0, 0.0), rel=1e-6)

  logits = np.random.default_rng(6).standard_normal((103, 1008)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for i in range(10):  # improved-gan's inception_score.py, verbatim in numpy
    part = p[(i * 103 // 10) : ((i + 1) * 103 // 10)]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  assert fid.inception_score(logits) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)


def test_fid_weights_path(tmp_path, monkeypatch):
  """Config value, else $VQGAN_JAX_INCEPTION, else None; a named file that is missing is a
  ConfigError naming the field and the path."""
  f = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  f.write_bytes(b'')
  g = tmp_path / 'env.npz'
  g.write_bytes(b'')
  monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
  assert fid.weights_path('') is None and fid.weights_path(None) is None
  assert fid.weights_path(str(f)) == str(f)
  monkeypatch.setenv(fid.WEIGHTS_ENV, str(g))
  assert fid.weights_path('') == str(g)
  assert fid.weights_path(str(f)) == str(f)  # the config wins
  missing = str(tmp_path / 'nope.pth')
  with pytest.raises(ConfigError, match=r'eval\.inception_weights: no file .*nope\.pth'):
    fid.weights_path(missing)
  monkeypatch.setenv(fid.WEIGHTS_ENV, missing)
  with pytest.raises(ConfigError, match=r'eval\.inception_weights \(from \$VQGAN_JAX_INCEPTION'):
    fid.weights_path(None)
  assert 'pt_inception-2015-12-05-6726825d.pth' in fid.MISSING_WEIGHTS
  assert '--config.eval.inception_weights' in fid.MISSING_WEIGHTS


def _write_bad_weights(kind, tmp_path, monkeypatch):
  """A bad Inception weights file of `kind`; returns (path, what the error must say)."""
  if kind == 'text named .npz':
    path = tmp_path / 'pt_inception.npz'
    path.write_text('mu sigma\n1 2 3\n')
    return path, r'pt_inception\.npz is not a readable \.npz: it is not a zip archive'
  if kind == 'truncated .npz':
    path = tmp_path / 'cut.npz'
    np.savez(
      path, **{k: np.zeros(s, np.float32) for k, s in list(conv.variable_shapes().items())[:20]}
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, r'cut\.npz is not a readable \.npz: it is a truncated or damaged zip archive'
  if kind == '.npz with other arrays':
    path = tmp_path / 'other.npz'
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))  # e.g. a statistics file
    return path, r'other\.npz lacks \S+ \(and 471 more\): is it'
  if kind == '.pth with other keys':
    torch = _torch()
    path = tmp_path / 'resnet.pth'
    torch.save({'conv1.weight': torch.zeros(4, 3, 3, 3), 'fc.bias': torch.zeros(1008)}, path)
    return path, r'resnet\.pth lacks \S+ \(and 470 more\): is it'
  # '.pth without torch': torch is installed here, so its absence is simulated (a mock).
  path = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  path.write_bytes(b'PK\x03\x04 not read: torch is asked for first')
  monkeypatch.setitem(sys.modules, 'torch', None)
  return path, r"needs torch.*pip install -e '\.\[reference\]'.*vqgan_jax\.convert inception"


@pytest.mark.parametrize(
  'kind',
  [
    'text named .npz',
    'truncated .npz',
    '.npz with other arrays',
    '.pth with other keys',
    '.pth without torch',
  ],
)
def test_bad_inception_weights_are_one_config_error(kind, tmp_path, monkeypatch):
  """Every unusable weights file is one ConfigError naming the setting it came from (the
  config field or $VQGAN_JAX_INCEPTION) and the file, never np.load's `allow_pickle` hint."""
  path, says = _write_bad_weights(kind, tmp_path, monkeypatch)
  monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
  with pytest.raises(ConfigError, match=r'^config\.eval\.inception_weights: .*' + says) as e:
    fid.load_weights(str(path))
  assert 'allow_pickle' not in str(e.value)
  monkeypatch.setenv(fid.WEIGHTS_ENV, str(path))
  env = r'^config\.eval\.inception_weights \(from \$VQGAN_JAX_INCEPTION\): '
  with pytest.raises(ConfigError, match=env + '.*' + says):
    fid.load_weights('')


def test_eval_refuses_bad_inception_weights_before_loading_anything(tmp_path):
  """`--mode=eval` checks the weights first: exit 2, one `error:` line, no traceback. The
  workdir's checkpoints/ folder is empty, so reading the model first would fail otherwise."""
  (tmp_path / 'run' / 'checkpoints').mkdir(parents=True)
  weights = tmp_path / 'pt_inception.npz'
  weights.write_text('not weights\n')
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'vqgan_jax.main',
      '--config=configs/fashion_mnist_vqgan.py:smoke',
      f'--workdir={tmp_path / "run"}',
      '--mode=eval',
      f'--config.eval.inception_weights={weights}',
    ],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    text=True,
    timeout=300,
  )
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert len(errors) == 1 and errors[0].startswith('error: config.eval.inception_weights: '), (
    proc.stderr
  )
  assert 'pt_inception.npz is not a readable .npz' in errors[0], proc.stderr
