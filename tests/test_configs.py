"""Every shipped config loads, with and without `:smoke`, and its stage-1 settings validate:
a typo in a config nobody runs in CI fails here instead of on a pod."""

import glob
import os

import pytest

from vqgan_jax import config_base
from vqgan_jax import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
  if not os.path.basename(p).startswith(('_', 'common'))
)


@pytest.mark.parametrize('name', FILES)
@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_config_loads_and_validates(name, arg):
  module = config_base.load_sibling(os.path.join(REPO, 'configs', 'x.py'), name)
  c = module.get_config(arg)
  assert c.stage in ('vqgan', 'transformer', 'classifier')
  if c.stage == 'vqgan':
    validate.validate_stage1(c, 1)
  assert 'eval' in c or c.stage == 'classifier'
