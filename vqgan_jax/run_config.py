"""The config saved with every checkpoint: its JSON form, its schema upgrade, and the
identity check between a checkpoint's config and the run that reads it.

Fields added after checkpoints were already being written have the value their absence meant
(`ADDED_FIELD_DEFAULTS`): `upgrade_config` fills them into a saved config as it is read, and
`config_differences` counts absent and that value as equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import json
from typing import Any

# Fields that change the shapes or meaning of saved arrays: a checkpoint whose config differs
# in any of these is refused. A name covers its whole subtree.
COMPATIBILITY_FIELDS = ('model', 'loss.disc_num_layers', 'loss.disc_ndf', 'stage')

# Fields added after checkpoints were already being written, with the value that means what a
# config without the field meant: absent and this value compare equal, and `upgrade_config`
# fills them into a saved config as it is read.
ADDED_FIELD_DEFAULTS = {
  'model.quantizer': 'vq',
  'model.kl_weight': 1e-8,
  'model.temperature': 1.0,
  # Stage-1 quantizer options (issue 13); their defaults are the original's quantizer.
  'model.codebook_dim': 0,
  'model.codebook_l2_norm': False,
  'model.ema_decay': 0.0,
  'model.restart_window': 0,
  'model.fsq_levels': [],
  'model.lfq_bits': 0,
  # Stage-1 loss and train options beyond the original; absent, they are off.
  'loss.adaptive_weight': True,
  'loss.lecam_weight': 0.0,
  'loss.lecam_decay': 0.999,
  'loss.r1_weight': 0.0,
  'loss.entropy_weight': 0.0,
  'loss.entropy_temperature': 0.01,
  'loss.entropy_anneal_steps': 0,
  'loss.entropy_anneal_factor': 1.0,
  'train.params_ema_decay': 0.0,
  'train.usage_window': 0,
  'train.usage_warning': 0.0,
  'transformer.kind': 'gpt',
  'data.crop_codes': 0,  # stage 2: the whole code grid
  # Stage-2 completion (issue 26); absent, --mode=sample samples.
  'sample.complete_folder': '',
  'sample.keep': 'top_half',
  'sample.complete_examples': 8,
  'sample.completions_per_image': 4,
  'sample.confidence': 'sampled',  # MaskGIT's ranking of its draws
  'sample.final_temperature': -1.0,  # MaskGIT: the temperature throughout
}
# Fields renamed since a config was saved: old name -> today's (same section), moved before
# the defaults apply. MaskGIT's `sample.steps` meant its decoding iterations (the GPT's
# `steps` count tokens).
RENAMED_FIELDS = {'sample.steps': 'sample.iterations'}
# Where the sections of ADDED_FIELD_DEFAULTS and RENAMED_FIELDS are in a saved config of each
# stage: a stage-2 config holds its first stages' model fields in stage1_config and cond.model.
_ADDED_FIELD_PLACES = {
  'vqgan': {'model': ('model',), 'loss': ('loss',), 'train': ('train',)},
  'transformer': {
    'model': ('stage1_config', 'cond.model'),
    'transformer': ('transformer',),
    'sample': ('sample',),
    'data': ('data',),
  },
}


def upgrade_config(saved: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config (plain JSON types) as today's schema reads it: each renamed field
  (`RENAMED_FIELDS`) under today's name, each field it predates (`ADDED_FIELD_DEFAULTS`) set
  to the value its absence meant. The one upgrade of a saved config, applied where one is read
  (`checkpoints.Checkpointer`), so that readers index fields instead of restating their
  defaults. Returns a new dict."""
  out = json.loads(json.dumps(dict(saved), default=repr))
  places = _ADDED_FIELD_PLACES.get(out.get('stage', 'vqgan'), {})

  def sections(name):
    section, field = name.split('.')
    for place in places.get(section, ()):
      node = out
      for key in place.split('.'):
        node = node.get(key) if isinstance(node, dict) else None
      if isinstance(node, dict):
        yield node, field

  for old, new in RENAMED_FIELDS.items():
    for node, field in sections(old):
      if field in node and new.split('.')[1] not in node:
        node[new.split('.')[1]] = node.pop(field)
  for name, value in ADDED_FIELD_DEFAULTS.items():
    for node, field in sections(name):
      if field not in node:
        node[field] = json.loads(json.dumps(value))
  return out


class IncompatibleCheckpointError(ValueError):
  """A checkpoint was written by a config that differs in a field that matters."""


def config_to_dict(config) -> dict[str, Any]:
  """A config (ConfigDict or mapping) as plain JSON types (tuples -> lists)."""
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=repr))


def _flatten(tree, prefix=''):
  if isinstance(tree, Mapping):
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}{key}.').items()}
  return {prefix[:-1]: tree}  # Lists compare whole.


_ABSENT = object()


def config_differences(
  saved_config: Mapping[str, Any], config, fields: Sequence[str] = COMPATIBILITY_FIELDS
) -> list[str]:
  """Lines `name: checkpoint X, config Y` for each differing field."""
  # JSON turns tuples into lists; compare like with like.
  saved = _flatten(json.loads(json.dumps(dict(saved_config), default=repr)))
  current = _flatten(config_to_dict(config))
  fmt = lambda v: '<absent>' if v is _ABSENT else repr(v)
  lines = []
  for name in sorted(set(saved) | set(current)):
    if not any(name == f or name.startswith(f.rstrip('.*') + '.') for f in fields):
      continue
    default = ADDED_FIELD_DEFAULTS.get(name, _ABSENT)
    a, b = saved.get(name, default), current.get(name, default)
    if a != b:
      lines.append(f'{name}: checkpoint {fmt(a)}, config {fmt(b)}')
  return lines


def check_compatible(
  saved_config: Mapping[str, Any],
  config,
  fields: Sequence[str] = COMPATIBILITY_FIELDS,
  where: str = '',
) -> None:
  """Raises one `IncompatibleCheckpointError` naming every field of `fields` (a name covers
  its subtree: `'model'` or `'model.*'`) where `saved_config` and `config` differ; `where`: the
  checkpoint's path, for the message."""
  lines = config_differences(saved_config, config, fields)
  if lines:
    at = f' {where}' if where else ''
    raise IncompatibleCheckpointError(
      f'Checkpoint{at} was written with an incompatible config; '
      'differing fields: ' + '; '.join(lines) + '.'
    )
