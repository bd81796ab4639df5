"""Sampling settings of a trained stage-2 run (GPT or MaskGIT) against fd_fmnist and class
accuracy: the sweep the demo configs' `config.sample` settings are picked from.

  python experiments/guidance_sweep.py --workdir=workdirs/fashion_mnist_transformer \
      --classifier_workdir=workdirs/fashion_mnist_classifier
  python experiments/guidance_sweep.py --rule [--kind=gpt]   # the pick from the rows

Each setting draws --num_samples class-balanced samples exactly as `--mode=eval` does
(`evaluate.sample_metrics`: keys from eval.seed, batches of --batch_size, fd_fmnist against the
training split's classifier features, cached in --stats_dir) and writes one row to --out
(experiments/results/guidance_sweep.jsonl, with `machine.info()`): the settings, fd_fmnist,
class_accuracy, seconds_per_sample (batches after the first, which compiles; the machine is
shared, so a rough figure), the workdir, its step and stage-2 kind. The grids (GRIDS): for the
GPT, guidance scale 1 (unguided) to 4 at temperature 1 and top-k 100, then temperature and
top-k around the middle scales; for MaskGIT, guidance at T = 8 and choice temperature 4.5, then
the choice temperature (annealed linearly to 0 over the iterations by the sampler) and T.

The rule (`pick`): the lowest fd_fmnist among the settings whose class accuracy is >= 90%; if
none reaches 90%, the highest class accuracy among those within 10% of the best fd_fmnist.
"""

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import ml_collections

from vqgan_jax import evaluate
from vqgan_jax import inference
from vqgan_jax import parallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (experiments/machine.py)

_WORKDIR = flags.DEFINE_string('workdir', '', 'A trained stage-2 run (GPT or MaskGIT).')
_STAGE1 = flags.DEFINE_string(
  'stage1_workdir', '', 'Its VQGAN run, when it moved since training (default: the saved one).'
)
_CLASSIFIER = flags.DEFINE_string('classifier_workdir', '', 'The demo classifier run.')
_NUM = flags.DEFINE_integer('num_samples', 1000, 'Class-balanced samples per setting.')
_BATCH = flags.DEFINE_integer('batch_size', 200, 'Samples per sampler call.')
_SEED = flags.DEFINE_integer('seed', -1, 'eval.seed of the samples (-1: the run config).')
_STATS = flags.DEFINE_string('stats_dir', '', 'Reference statistics cache (default: workdir).')
_SETTINGS = flags.DEFINE_list('settings', [], 'Run only these setting indices of the grid.')
_RULE = flags.DEFINE_bool('rule', False, "Print the rule's pick from --out's rows and exit.")
_TABLE = flags.DEFINE_bool('table', False, "With --rule: also print each kind's markdown table.")
_KIND = flags.DEFINE_string('kind', '', 'With --rule: only rows of this kind (gpt, maskgit).')
_PLOT = flags.DEFINE_string(
  'plot', '', 'Also write an SVG of fd_fmnist and class accuracy vs guidance scale here.'
)
_OUT = flags.DEFINE_string(
  'out', 'guidance_sweep.jsonl', "Rows file under experiments/results/ (or a path); '' prints."
)

MIN_ACCURACY = 0.9  # the bar for guided samples
FD_SLACK = 0.10  # when no setting reaches it: within this share of the best fd_fmnist

# (cfg_scale, temperature, top_k) for the GPT; top_k 0 is no top-k.
GPT_GRID = [(s, 1.0, 100) for s in (1.0, 1.5, 2.0, 3.0, 4.0)] + [
  (1.5, 1.0, 0),
  (2.0, 1.0, 0),
  (3.0, 1.0, 0),
  (2.0, 0.9, 100),
  (3.0, 0.9, 100),
  (2.0, 1.0, 30),
  (3.0, 1.0, 30),
  # Added after the first pass (guidance cut diversity: fd rose with the scale): a smaller
  # scale, and a hotter sampler without top-k to give back the diversity guidance takes.
  (1.25, 1.0, 100),
  (2.0, 1.1, 0),
  (2.0, 1.2, 0),
  (3.0, 1.2, 0),
  # Between 1.5 and 2 without top-k, where a GPT trained twice as long crosses 90%.
  (1.75, 1.0, 0),
  # Between 2 and 3, for a demo run whose scale 2 stays below 90% (the demo's seeds: 87.8-90.3%).
  (2.5, 1.0, 0),
  (2.25, 1.0, 0),
]
# (cfg_scale, iterations, choice_temperature[, temperature, top_k, confidence,
# final_temperature]) for MaskGIT (default temperature 1, no top-k, MaskGIT's 'sampled'
# confidence, the temperature at every iteration: final_temperature None).
MASKGIT_GRID = [(s, 8, 4.5) for s in (1.0, 1.5, 2.0, 3.0, 4.0)] + [
  (2.0, 8, 2.0),
  (2.0, 8, 1.0),
  (3.0, 8, 2.0),
  (2.0, 4, 4.5),
  (2.0, 12, 4.5),
  (2.0, 16, 4.5),
  (3.0, 12, 4.5),
  # Added (issue 26, item 2): label smoothing 0.1 trains MaskGIT to give every code some
  # mass (0.1 / 256 each), which temperature-1 draws sample; top-k and a cooler draw cut it.
  (2.0, 8, 4.5, 1.0, 50),
  (2.0, 4, 4.5, 1.0, 50),
  (2.0, 8, 4.5, 0.8, 0),
  (2.0, 8, 4.5, 1.0, 10),
  # They did not (fd rose): MaskGIT's samples lack diversity, not precision. More randomness:
  # a hotter draw, more Gumbel noise on the confidence.
  (2.0, 8, 4.5, 1.3, 0),
  (2.0, 8, 10.0),
  (2.0, 8, 16.0),
  (3.0, 8, 16.0),
  (2.0, 4, 10.0),
  # The hotter draw helped most (fd 7.24 at 87.6%): around it, with more guidance.
  (2.5, 8, 4.5, 1.3, 0),
  (3.0, 8, 4.5, 1.3, 0),
  (3.0, 8, 4.5, 1.5, 0),
  (2.0, 8, 4.5, 1.5, 0),
  (3.0, 4, 4.5, 1.3, 0),
  (3.0, 8, 4.5, 1.8, 0),
  (4.0, 8, 4.5, 1.5, 0),
  (4.0, 8, 4.5, 1.8, 0),
  (3.0, 12, 4.5, 1.5, 0),
  (4.0, 8, 4.5, 2.2, 0),
  # Hotter draws plateau near fd 7. Why the draws need heating: MaskGIT ranks by the drawn
  # code's log p, keeping the draws that came out likely. Ranking by the position's largest
  # log p (blind to the draw) leaves each kept code a plain draw (confidence='max').
  (2.0, 8, 4.5, 1.0, 0, 'max'),
  (3.0, 8, 4.5, 1.0, 0, 'max'),
  (2.5, 8, 4.5, 1.0, 0, 'max'),
  (4.0, 8, 4.5, 1.0, 0, 'max'),
  (3.0, 8, 2.0, 1.0, 0, 'max'),
  (3.0, 8, 0.0, 1.0, 0, 'max'),
  (3.0, 4, 4.5, 1.0, 0, 'max'),
  (3.0, 12, 4.5, 1.0, 0, 'max'),
  (3.0, 8, 4.5, 1.2, 0, 'max'),
  (1.0, 8, 4.5, 1.0, 0, 'max'),
  # Sampler or model? Choice temperature 1000 swamps the ranking, so the codes are decoded in
  # a random order; at T = 64 one code per iteration: exact draws from the model's own joint
  # (an any-order autoregression), what any faster decoding approximates.
  (1.0, 64, 1000.0, 1.0, 0, 'max'),
  (1.0, 8, 1000.0, 1.0, 0, 'max'),
  # Draws that warm up over the iterations (final_temperature): cool while the few first codes
  # set the layout, hot for the many last ones, whose draws the ranking still filters.
  (3.0, 8, 4.5, 1.0, 0, 'sampled', 2.0),
  (3.0, 8, 4.5, 2.0, 0, 'sampled', 1.0),
  (3.0, 8, 4.5, 0.8, 0, 'sampled', 2.2),
  (3.25, 8, 4.5, 1.0, 0, 'sampled', 2.0),
  (3.5, 8, 4.5, 1.0, 0, 'sampled', 2.0),
  (3.5, 8, 4.5, 0.8, 0, 'sampled', 2.2),
  (4.0, 8, 4.5, 1.0, 0, 'sampled', 2.5),
  (2.0, 8, 4.5, 1.0, 0, 'sampled', 2.0),
  (2.5, 8, 4.5, 1.0, 0, 'sampled', 2.0),
  (3.25, 8, 3.0, 1.0, 0, 'sampled', 2.0),
  (3.25, 8, 6.0, 1.0, 0, 'sampled', 2.0),
  # Between 2.5 and 3 (the Zen 4 demo run of 2026-12-08 crosses 90% there), matching the GPT's
  # scale 2.25: the generators compared at the same class accuracy, not at grid points.
  (2.75, 8, 4.5, 1.0, 0, 'sampled', 2.0),
]


def settings(kind):
  """The grid of `kind` as `TrainedTransformer.sample` keyword arguments."""
  if kind == 'gpt':
    return [dict(cfg_scale=s, temperature=t, top_k=k) for s, t, k in GPT_GRID]
  defaults = (1.0, 0, 'sampled', None)
  keys = ('temperature', 'top_k', 'confidence', 'final_temperature')
  return [
    dict(cfg_scale=s, iterations=n, choice_temperature=c, **dict(zip(keys, rest)))
    for s, n, c, *rest in (g + defaults[len(g) - 3 :] for g in MASKGIT_GRID)
  ]


def pick(rows, min_accuracy=MIN_ACCURACY, fd_slack=FD_SLACK):
  """The rule: the row of lowest fd_fmnist with class_accuracy >= min_accuracy; if none
  reaches it, the highest class_accuracy among the rows within fd_slack of the best fd."""
  if not rows:
    raise ValueError('no sweep rows to pick from')
  good = [r for r in rows if r['class_accuracy'] >= min_accuracy]
  if good:
    return min(good, key=lambda r: r['fd_fmnist'])
  best = min(r['fd_fmnist'] for r in rows)
  near = [r for r in rows if r['fd_fmnist'] <= best * (1 + fd_slack)]
  return max(near, key=lambda r: r['class_accuracy'])


def read_rows(path, kind=''):
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if not kind or r.get('kind') == kind]


def _results_path(out):
  return out if os.path.dirname(out) else os.path.join(machine.RESULTS, out)


def _config(workdir):
  config, step = inference._saved_config(workdir, None)  # noqa: SLF001  (the run's own config)
  if _STAGE1.value:
    config.stage1_workdir = _STAGE1.value
  config.eval.classifier_workdir = _CLASSIFIER.value
  config.eval.num_samples = _NUM.value
  config.eval.stats_dir = _STATS.value
  if _SEED.value >= 0:
    config.eval.seed = _SEED.value
  config.sample.batch_size = _BATCH.value
  return ml_collections.ConfigDict(config.to_dict()), step


def sweep():
  config, step = _config(_WORKDIR.value)
  mesh = parallel.make_mesh(config.mesh)
  run = inference.load_transformer_for_config(config, _WORKDIR.value, step, mesh)
  exts = {m: e for m, e in evaluate.extractors(config, mesh).items() if m.startswith('fd_')}
  if not exts:
    raise app.UsageError('--classifier_workdir is required (fd_fmnist and class accuracy)')
  split = config.eval.split or config.data.train_split
  ref = evaluate.reference_stats(config, _WORKDIR.value, split, exts, mesh)
  labels = evaluate._eval_labels(config, run.layout)  # noqa: SLF001  (--mode=eval's labels)
  grid = settings(run.kind)
  chosen = [int(i) for i in _SETTINGS.value] or range(len(grid))
  rows = []
  for i in chosen:
    args = {**run.sampler_args(), **grid[i]}
    args['top_k'] = int(args['top_k']) or None
    t0 = time.perf_counter()
    # A setting's final_temperature None is its temperature throughout: `sample` reads a
    # temperature given without a final one as constant, whatever the run's config warms to.
    result, *_, seconds = evaluate.sample_metrics(run, config, labels, exts, ref, args)
    timed = seconds[1:] or seconds
    row = {
      'name': 'guidance_sweep',
      'kind': run.kind,
      'setting': i,
      **{k: v for k, v in args.items() if k != 'top_p'},
      'top_k': args['top_k'] or 0,
      **{k: v for k, v in result.items() if k != 'num_samples'},
      'num_samples': result['num_samples'],
      'seconds_per_sample': sum(timed) / (len(timed) * _BATCH.value),
      'seconds_per_batch': statistics.median(timed),
      'seconds': time.perf_counter() - t0,
      'seed': int(config.eval.seed),
      'workdir': os.path.abspath(_WORKDIR.value),
      'step': run.step,
      'drop_prob': float(config.cond.drop_prob),
      'label_smoothing': float(config.transformer.get('label_smoothing', 0.0)),
      'base_lr': float(config.optim.base_lr),
      'num_steps': int(config.train.num_steps),
      'reference': split,
    }
    rows.append(machine.write_row(_OUT.value, row))
  return rows


# The plot's lines against guidance scale: (kind, the other settings held, colour). A row
# without a setting had its default (ROW_DEFAULTS: rows from before the field).
_MASKGIT_T8 = dict(
  iterations=8, choice_temperature=4.5, temperature=1.0, top_k=0, final_temperature=None
)
SCALE_AXIS = (
  ('gpt', dict(temperature=1.0, top_k=100), '#1f77b4'),
  ('maskgit', dict(_MASKGIT_T8, confidence='sampled'), '#d62728'),
  ('maskgit', dict(_MASKGIT_T8, confidence='max'), '#2ca02c'),
  ('maskgit', dict(_MASKGIT_T8, confidence='sampled', final_temperature=2.0), '#9467bd'),
)
# Short names in the plot's legend.
LEGEND = dict(
  iterations='T',
  choice_temperature='choice temp.',
  temperature='temp.',
  top_k='top-k',
  final_temperature='to',  # "temp. 1, to 2"
)
ROW_DEFAULTS = {'confidence': 'sampled', 'final_temperature': None}


def svg_plot(rows, path):
  """Two panels, fd_fmnist and class accuracy against guidance scale, a line per generator
  (its SCALE_AXIS rows; the latest row of each scale). No matplotlib in the venv: plain SVG."""
  lines = {}
  for n, (kind, held, _) in enumerate(SCALE_AXIS):
    for r in rows:
      if r['kind'] == kind and all(r.get(k, ROW_DEFAULTS.get(k)) == v for k, v in held.items()):
        lines.setdefault(n, {})[r['cfg_scale']] = r
  panels = [('fd_fmnist', 'fd_fmnist (lower is better)'), ('class_accuracy', 'class accuracy')]
  w, h, pad = 360, 260, 50
  out = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h + 30}" '
    'font-family="sans-serif" font-size="11">'
  ]
  scales = [s for line in lines.values() for s in line] or [1.0]
  x0, x1 = min(scales), max(max(scales), min(scales) + 1)
  for p, (key, title) in enumerate(panels):
    vals = [r[key] for line in lines.values() for r in line.values()]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if key == 'class_accuracy':
      lo, hi = min(lo, MIN_ACCURACY), max(hi, MIN_ACCURACY)
    lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
    left = p * w + pad

    def xy(s, v, left=left, lo=lo, hi=hi):
      return left + (s - x0) / (x1 - x0) * (w - pad - 10), h - pad + 10 - (v - lo) / (hi - lo) * (
        h - pad - 20
      )

    out.append(f'<text x="{left}" y="15" font-size="13">{title}</text>')
    out.append(
      f'<rect x="{left}" y="20" width="{w - pad - 10}" height="{h - pad - 10}" '
      'fill="none" stroke="#888"/>'
    )
    for t in range(5):
      v = lo + (hi - lo) * t / 4
      _, y = xy(x0, v)
      label = f'{v:.0%}' if key == 'class_accuracy' else f'{v:.2f}'
      out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    for s in sorted(set(scales)):
      x, _ = xy(s, lo)
      out.append(f'<text x="{x:.1f}" y="{h - pad + 25}" text-anchor="middle">{s:g}</text>')
    out.append(
      f'<text x="{left + (w - pad) / 2}" y="{h - pad + 42}" text-anchor="middle">'
      'guidance scale (1 = unguided)</text>'
    )
    if key == 'class_accuracy':
      _, y = xy(x0, MIN_ACCURACY)
      out.append(
        f'<line x1="{left}" x2="{left + w - pad - 10}" y1="{y:.1f}" y2="{y:.1f}" '
        'stroke="#888" stroke-dasharray="4 3"/>'
      )
    for row, (n, line) in enumerate(sorted(lines.items())):
      kind, held, color = SCALE_AXIS[n]
      pts = [xy(s, line[s][key]) for s in sorted(line)]
      path_d = ' '.join(f'{x:.1f},{y:.1f}' for x, y in pts)
      out.append(f'<polyline points="{path_d}" fill="none" stroke="{color}" stroke-width="2"/>')
      out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts]
      settings_text = ', '.join(
        f'{LEGEND.get(k, k)} {v:g}' if k != 'confidence' else v
        for k, v in held.items()
        if v is not None and not (k == 'top_k' and v == 0)
      )
      out.append(
        f'<text x="{left + 8}" y="{36 + 14 * row}" fill="{color}">{kind} ({settings_text})</text>'
      )
  out.append('</svg>')
  with open(path, 'w') as f:
    f.write('\n'.join(out) + '\n')


# The markdown table's columns per kind: (header, row key).
TABLE_COLUMNS = {
  'gpt': (('scale', 'cfg_scale'), ('temperature', 'temperature'), ('top-k', 'top_k')),
  'maskgit': (
    ('scale', 'cfg_scale'),
    ('T', 'iterations'),
    ('choice temperature', 'choice_temperature'),
    ('temperature', 'temperature'),
    ('top-k', 'top_k'),
    ('confidence', 'confidence'),
    ('final temperature', 'final_temperature'),
  ),
}


def table(rows, kind) -> str:
  """The README's markdown table of `kind`'s rows (the latest of each setting, sorted), the
  rule's pick in bold."""
  columns = TABLE_COLUMNS[kind]
  latest = {}
  for r in rows:
    if r['kind'] == kind:
      latest[tuple(r.get(k, ROW_DEFAULTS.get(k)) for _, k in columns)] = r
  best = pick(list(latest.values()))
  cell = lambda v: (
    '-'
    if v is None
    else 'none'
    if v == 0 and not isinstance(v, float)
    else f'{v:g}'
    if isinstance(v, (int, float))
    else str(v)
  )
  lines = [
    '| ' + ' | '.join(h for h, _ in columns) + ' | fd_fmnist | class accuracy |',
    '|---' * (len(columns) + 2) + '|',
  ]
  order = lambda k: tuple(
    (1, str(v)) if isinstance(v, str) else (0, -1 if v is None else v) for v in k
  )
  for key in sorted(latest, key=order):
    r = latest[key]
    cells = [cell(v) for v in key] + [f'{r["fd_fmnist"]:.2f}', f'{r["class_accuracy"]:.1%}']
    if r is best:
      cells = [f'**{c}**' for c in cells]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  if _RULE.value:
    rows = read_rows(_results_path(_OUT.value), _KIND.value)
  else:
    if not (_WORKDIR.value and _CLASSIFIER.value):
      raise app.UsageError('--workdir and --classifier_workdir are required')
    rows = sweep()
  kinds = sorted({r['kind'] for r in rows})
  for kind in kinds:
    best = pick([r for r in rows if r['kind'] == kind])
    keys = ('kind', 'cfg_scale', 'temperature', 'top_k', 'iterations', 'choice_temperature')
    keys += ('confidence', 'final_temperature')
    picked = {k: best[k] for k in keys if k in best}
    figures = {k: best[k] for k in ('fd_fmnist', 'class_accuracy', 'step', 'workdir')}
    print('pick:', json.dumps({**picked, **figures}))
    if _TABLE.value:
      print(table([r for r in rows if r['kind'] == kind], kind))
  if _PLOT.value:
    svg_plot(read_rows(_results_path(_OUT.value)) if _OUT.value else rows, _PLOT.value)
    print('plot:', _PLOT.value)


if __name__ == '__main__':
  app.run(main)
