"""The paper's context experiment on Fashion-MNIST (issue 27): one GPT, the demo's, over first
stages of downsampling factor f = 1 (k-means over pixel values), 2, 4 (the demo's) and 8
(FSQ with the demo's loss), trained on 8x8-code windows (8f x 8f pixel crops; at f = 4 and
8 the whole 32x32 image is 8x8 / 4x4 codes) and sampled at the full 32x32 with the sliding
window where the window is smaller.

  python experiments/context_study.py --root=/tmp/context \\
      --classifier_workdir=workdirs/fashion_mnist_classifier \\
      [--runs=1:0,1:1,2:0,4:0,4:1,8:0,vqvae:0]
  python experiments/context_study.py --root=/tmp/context_smoke --smoke --runs=1:0,4:0

Each run (f:seed) works in <root>/f<f>_seed<seed>/{stage1,gpt} (a rerun resumes or, once a
part is finished, only re-evaluates it): stage 1 (the k-means fit at f = 1, the demo's
VQGAN training otherwise, its final eval over the whole test split), --mode=encode, the GPT
(the demo's size, steps and sampling setting; its final eval: held-out bits per code on the
windows), then --mode=eval's 1000 class-balanced full-size samples (fd_fmnist and class
accuracy with --classifier_workdir) and a timed sampling of --time_samples after compiling.
`vqvae:<seed>` is the paper's baseline at f = 4: the demo's VQGAN as a VQVAE
(configs/fashion_mnist_vqgan.py:vqvae: the original's vq, no LPIPS, no GAN).

An f = 1 sample costs 1024 sliding-window steps (16 times the f = 4 sample's 64 cached ones),
so f = 1 draws --f1_num_samples (200) for its fd and accuracy; every row also carries
`fd_fmnist_<n>` over its first n = --f1_num_samples samples (class-balanced: labels cycle
through the classes), the like-for-like figure (Frechet distances grow as n shrinks).
One JSON row per run is printed and appended to --out by `machine.write_row` (with where it
ran); the speed-up against f = 1 (same seed, else seed 0) is filled in for rows after an f = 1
row of the file.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

from vqgan_jax import config_base  # noqa: E402
from vqgan_jax import encode as codes_lib  # noqa: E402
from vqgan_jax import evaluate as evaluate_lib  # noqa: E402
from vqgan_jax import fid  # noqa: E402
from vqgan_jax import images as images_lib  # noqa: E402
from vqgan_jax import inference  # noqa: E402
from vqgan_jax import parallel  # noqa: E402
from vqgan_jax.train import transformer_trainer  # noqa: E402
from vqgan_jax.train import vqgan_trainer  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = flags.DEFINE_string('root', None, "Folder for the runs' workdirs.")
_RUNS = flags.DEFINE_list('runs', ['1:0', '1:1', '2:0', '4:0', '4:1', '8:0'], 'f:seed runs.')
_K = flags.DEFINE_integer('k', 16, 'k-means centres of the f = 1 first stage.')
_WINDOW = flags.DEFINE_integer('window', 8, "The GPT's window in codes (the paper: 16).")
_CLASSIFIER = flags.DEFINE_string(
  'classifier_workdir', '', 'A classifier run (configs/fashion_mnist_classifier.py): fd_fmnist.'
)
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, "--mode=eval's samples per run.")
_F1_NUM_SAMPLES = flags.DEFINE_integer(
  'f1_num_samples', 200, "--mode=eval's samples at f = 1, and the n of every row's fd_fmnist_<n>."
)
_TIME_SAMPLES = flags.DEFINE_integer('time_samples', 10, 'Samples of the timed sampling.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'The smoke configs (16x16 images): plumbing only.')
_REPORT = flags.DEFINE_string(
  'report',
  '',
  "Train nothing: print the markdown table of --out's rows and write the samples figure (one "
  'row of class-balanced samples per first stage, seed 0) to this PNG.',
)
_OUT = flags.DEFINE_string(
  'out',
  os.path.join(_REPO, 'experiments', 'results', 'context_study.jsonl'),
  'JSON lines file the rows are appended to.',
)

# f -> the demo VQGAN's ch_mult (attention at the lowest resolution, as the demo's f = 4).
CH_MULT = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 2)}


def _config(name, arg=None):
  module = config_base.load_sibling(os.path.join(_REPO, 'configs', 'x.py'), name)
  return module.get_config(arg)


def stage1_config(f: int, seed: int, smoke: bool, vqvae: bool = False):
  """f = 1: k-means over pixels (configs/fashion_mnist_pixels.py, --k centres); else the
  demo's VQGAN (FSQ, its loss and budget; `vqvae`: the VQVAE baseline) with ch_mult giving f."""
  if f == 1:
    c = _config('fashion_mnist_pixels', f'k={_K.value}' + (',smoke' if smoke else ''))
  else:
    args = ','.join(a for a, on in (('smoke', smoke), ('vqvae', vqvae)) if on)
    c = _config('fashion_mnist_vqgan', args or None)
    c.model.ch_mult = CH_MULT[f]
    c.model.attn_resolutions = (c.model.resolution // f,)
  c.seed = seed
  c.eval.classifier_workdir = _CLASSIFIER.value
  return c


def stage2_config(stage1, stage1_workdir: str, f: int, seed: int, smoke: bool):
  """The demo's GPT (configs/fashion_mnist_transformer.py) over `stage1`'s codes, on windows
  of --window codes (the whole grid when it is no larger)."""
  c = _config('fashion_mnist_transformer', 'smoke' if smoke else None)
  c.stage1_workdir = stage1_workdir
  c.stage1_config = config_base.stage1_model_fields(stage1)
  c.data.image_size = stage1.data.image_size
  grid = stage1.data.image_size // f
  c.data.crop_codes = _WINDOW.value if grid > _WINDOW.value else 0
  c.seed = seed
  n = _F1_NUM_SAMPLES.value if f == 1 else _NUM_SAMPLES.value
  c.eval.update(classifier_workdir=_CLASSIFIER.value, num_samples=n)
  return c


def _fd_of_first(config, workdir, step, n):
  """fd_fmnist of the first n samples --mode=eval saved (None without a classifier)."""
  mesh = parallel.make_mesh(config.mesh)
  exts = {m: e for m, e in evaluate_lib.extractors(config, mesh).items() if m == 'fd_fmnist'}
  if not exts:
    return None
  split = config.eval.split or config.data.train_split
  ref = evaluate_lib.reference_stats(config, workdir, split, exts, mesh)
  with np.load(os.path.join(workdir, f'eval_samples_{step}.npz')) as z:
    images = z['arr_0'][:n]
  acc = fid.StatsAccumulator(exts['fd_fmnist'].feature_dim)
  for start in range(0, len(images), 100):
    x = images[start : start + 100].astype(np.float32) / 127.5 - 1.0
    acc.add(exts['fd_fmnist'](x)['features'], np.ones((len(x),), bool))
  mu, sigma = acc.mu_sigma()
  return fid.fid_from_stats(ref['fd_fmnist'], {'mu': mu, 'sigma': sigma})


def _timed_sampling(config, workdir, n):
  """Seconds per full-size sample of one batch of n class-balanced samples, after a first
  call compiled the sampler for that batch."""
  run = inference.load_transformer_for_config(config, workdir)
  layout, s = run.layout, config.sample
  run.batch_size = n
  cond = run.condition_for_class(np.arange(n, dtype=np.int32) % max(layout.n_classes, 1))
  kw = dict(temperature=float(s.temperature), top_k=int(s.top_k) or None, grid=layout.sample_grid)
  jax.block_until_ready(run.sample(cond, jax.random.key(0), **kw))
  t0 = time.perf_counter()
  jax.block_until_ready(run.sample(cond, jax.random.key(1), **kw))
  return (time.perf_counter() - t0) / n


def _finished(config, workdir):
  return os.path.isdir(os.path.join(workdir, 'checkpoints', str(config.train.num_steps)))


def run_one(f: int, seed: int, root: str, smoke: bool, vqvae: bool = False) -> dict:
  base = os.path.join(root, f'vqvae_seed{seed}' if vqvae else f'f{f}_seed{seed}')
  wd1, wd2 = os.path.join(base, 'stage1'), os.path.join(base, 'gpt')
  c1 = stage1_config(f, seed, smoke, vqvae)
  c2 = stage2_config(c1, wd1, f, seed, smoke)
  # A part finished before (a rerun, or workdirs copied in) is only re-evaluated: its
  # training time is then unknown (None).
  trained = [_finished(c1, wd1), _finished(c2, wd2)]
  t0 = time.perf_counter()
  s1 = vqgan_trainer.train_and_evaluate(c1, wd1)
  stage1_s = None if trained[0] else time.perf_counter() - t0
  codes_lib.encode(c2, wd2)
  t0 = time.perf_counter()
  s2 = transformer_trainer.train_and_evaluate(c2, wd2)
  gpt_s = None if trained[1] else time.perf_counter() - t0
  ev, path = evaluate_lib.evaluate(c2, wd2)
  with open(path) as fh:
    step = json.load(fh)['step']
  n = _F1_NUM_SAMPLES.value
  per_sample = _timed_sampling(c2, wd2, _TIME_SAMPLES.value)
  size = c1.data.image_size
  grid = size // f
  window = min(grid, _WINDOW.value)
  return {
    'f': f,
    'seed': seed,
    'first_stage': f'kmeans{_K.value}'
    if f == 1
    else ('vqvae_' if vqvae else '') + f'{c1.model.quantizer}{c1.model.n_embed}',
    'image_px': size,
    'codes_per_image': grid * grid,
    'window_codes': window,
    'window_px': window * f,
    'stage1_psnr': s1.get('psnr'),
    'stage1_lpips': s1.get('lpips'),
    'stage1_fd_fmnist': s1.get('fd_fmnist'),
    'gpt_bits_per_code': s2.get('bits_per_token'),
    # Held out on the windows: window^2 codes cover (window f)^2 pixels.
    'gpt_bits_per_pixel': s2.get('bits_per_token', float('nan')) / (f * f),
    'fd_fmnist': ev.get('fd_fmnist'),
    'class_accuracy': ev.get('class_accuracy'),
    f'fd_fmnist_{n}': _fd_of_first(c2, wd2, step, n),
    'num_samples': ev.get('num_samples'),
    'seconds_per_sample': per_sample,
    'eval_seconds': ev.get('seconds'),
    'stage1_seconds': stage1_s,
    'gpt_seconds': gpt_s,
    'gpt_steps': c2.train.num_steps,
    'smoke': smoke,
    'workdir': base,
  }


def _speedup(row, rows):
  """seconds_per_sample of the f = 1 row (same seed, else any) over this row's."""
  ref = [r for r in rows if r['f'] == 1 and r.get('smoke') == row.get('smoke')]
  same = [r for r in ref if r['seed'] == row['seed']] or ref
  if not same or not row.get('seconds_per_sample'):
    return None
  return same[-1]['seconds_per_sample'] / row['seconds_per_sample']


def _label(row):
  if row['first_stage'].startswith('vqvae'):
    return f'VQVAE f = {row["f"]}'
  return f'f = {row["f"]} ({"k-means" if row["f"] == 1 else "VQGAN"})'


def _order(rows):
  """Rows grouped by first stage (f ascending, the VQVAE after its f), latest row per run."""
  latest = {(r['first_stage'], r['f'], r['seed'], r.get('smoke')): r for r in rows}
  return sorted(
    latest.values(), key=lambda r: (r['f'], r['first_stage'].startswith('vqvae'), r['seed'])
  )


def _cell(values, fmt):
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  if len(values) == 1:
    return format(values[0], fmt)
  return f'{format(np.mean(values), fmt)} ± {format(np.std(values), fmt)}'


# (header, row key, format) of the README table; several seeds give mean ± std.
TABLE = (
  ('codes / image', 'codes_per_image', 'd'),
  ('window (px)', 'window_px', 'd'),
  ('stage-1 PSNR', 'stage1_psnr', '.2f'),
  ('LPIPS', 'stage1_lpips', '.3f'),
  ('bits / code', 'gpt_bits_per_code', '.3f'),
  ('bits / pixel', 'gpt_bits_per_pixel', '.3f'),
  ('fd_fmnist', 'fd_fmnist', '.2f'),
  ('fd_fmnist (first n)', 'fd_fmnist_n', '.2f'),
  ('class acc.', 'class_accuracy', '.1%'),
  ('s / sample', 'seconds_per_sample', '.4f'),
  ('speed-up vs f = 1', 'speedup_vs_f1', '.1f'),
)


def _first_n(row):
  return next((v for k, v in row.items() if k.startswith('fd_fmnist_')), None)


def table(rows) -> str:
  groups = {}
  for r in _order(rows):
    groups.setdefault(_label(r), []).append(r)
  n = _F1_NUM_SAMPLES.value
  headers = [h.replace('first n', f'first {n}') for h, _, _ in TABLE]
  lines = [
    '| first stage | seeds | ' + ' | '.join(headers) + ' |',
    '|---' * (len(TABLE) + 2) + '|',
  ]
  for label, rs in groups.items():
    cells = []
    for _, key, fmt in TABLE:
      if key == 'speedup_vs_f1':
        values = [_speedup(r, rows) for r in rs]
      elif key == 'fd_fmnist_n':  # n: the run's --f1_num_samples
        values = [_first_n(r) for r in rs]
      else:
        values = [r.get(key) for r in rs]
      cells.append(_cell(values, fmt) if fmt != 'd' else str(rs[0][key]))
    seeds = ','.join(str(r['seed']) for r in rs)
    lines.append(f'| {label} | {seeds} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def figure(rows, path, per_class=1):
  """One row per first stage: `per_class` samples of each class from seed 0's --mode=eval
  samples (labels cycle through the classes, so the first 10 are classes 0-9)."""
  strips, names = [], []
  for r in _order(rows):
    if r['seed'] != 0:
      continue
    names.append(_label(r))
    gpt = os.path.join(r['workdir'], 'gpt')
    files = sorted(f for f in os.listdir(gpt) if f.startswith('eval_samples_'))
    with np.load(os.path.join(gpt, files[-1])) as z:
      images, labels = z['arr_0'], z['arr_1']
    picked = [images[labels == k][:per_class] for k in range(10)]
    strips.append(np.concatenate(picked))
  ncol, scale, margin = 10 * per_class, 3, 150
  grid = images_lib.make_grid(np.concatenate(strips), ncol)
  img = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).convert('RGB')
  img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  out = Image.new('RGB', (img.width + margin, img.height), 'white')
  out.paste(img, (margin, 0))
  draw, row_h = ImageDraw.Draw(out), img.height / len(names)
  for i, label in enumerate(names):
    draw.text((6, int((i + 0.5) * row_h) - 6), label, fill='black')
  out.save(path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if _REPORT.value:
    with open(_OUT.value) as fh:
      rows = [json.loads(line) for line in fh if line.strip()]
    print(table(rows))
    figure(rows, _REPORT.value)
    print('figure:', _REPORT.value)
    return
  if not _ROOT.value:
    raise app.UsageError('--root (the folder for the runs) is required')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
  runs = []
  for item in _RUNS.value:
    f, _, seed = item.partition(':')
    if f != 'vqvae' and (not f.isdigit() or int(f) not in (1, *CH_MULT)):
      raise app.UsageError(f'--runs: f={f} not in (1, {", ".join(map(str, CH_MULT))}, vqvae)')
    runs.append((4, int(seed or 0), True) if f == 'vqvae' else (int(f), int(seed or 0), False))
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  rows = []
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as fh:
      rows = [json.loads(line) for line in fh if line.strip()]
  for f, seed, vqvae in sorted(runs):  # f = 1 first: the others' speed-up reads it
    row = run_one(f, seed, _ROOT.value, _SMOKE.value, vqvae)
    row['speedup_vs_f1'] = _speedup(row, rows)
    rows.append(machine.write_row(_OUT.value, row))


if __name__ == '__main__':
  app.run(main)
