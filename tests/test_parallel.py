"""One mesh for both stages and the config's table of logical-axis rules (no compiles)."""

import jax
import numpy as np
import pytest

from configs import common
from configs import common_transformer
from configs import fashion_mnist_vqgan
from vqgan_jax import parallel
from vqgan_jax.train import stage1
from vqgan_jax.train import stage2
from vqgan_jax.train import stage2_config
from vqgan_jax.validate import ConfigError


def _abstract(**shapes):
  return {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}


def test_one_mesh_with_a_tensor_axis():
  assert parallel.MESH_AXES == ('data', 'fsdp', 'tensor')
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert dict(parallel.make_mesh({'data': -1, 'fsdp': 2}).shape) == {
    'data': 4,
    'fsdp': 2,
    'tensor': 1,
  }  # tensor defaults to 1
  assert dict(parallel.make_mesh({'data': 2, 'tensor': -1}).shape) == {
    'data': 2,
    'fsdp': 1,
    'tensor': 4,
  }
  assert parallel.batch_divisor(mesh) == 4  # batches split over data x fsdp
  for bad, msg in [
    ({'data': 2, 'model': 4}, "unknown axis 'model'"),
    ({'data': -1, 'tensor': 0}, '>= 1'),
    ({'data': 3, 'tensor': -1}, 'does not divide'),
    ({'data': 2, 'fsdp': 2, 'tensor': 1}, 'multiply to 4'),
  ]:
    with pytest.raises(ConfigError, match=msg):
      parallel.make_mesh(bad)
  assert not hasattr(stage2, 'make_mesh')  # stage 2 uses parallel's mesh


def test_one_table_in_both_stages_configs():
  s1 = fashion_mnist_vqgan.get_config('smoke')
  s2 = common_transformer.stage2_base()
  assert (
    parallel.axis_rules(s1)
    == parallel.axis_rules(s2)
    == parallel.normalize_rules(common.logical_axis_rules())
  )
  # The GPT's own defaults (for standalone model use) are the table's GPT entries.
  table = dict(parallel.axis_rules(s2))
  for logical, axes in parallel.DEFAULT_RULES:
    assert table[logical] == axes, logical
  # A rule naming an axis the mesh does not have is a config error, not a silent no-op.
  s1.logical_axis_rules = (('conv_out', 'model'),)
  with pytest.raises(ConfigError, match=r"config\.logical_axis_rules.*'model'"):
    parallel.axis_rules(s1)
  # Rules restored from a JSON config (lists) are accepted.
  assert parallel.normalize_rules([['batch', ['data', 'fsdp']], ['embed', None]]) == (
    ('batch', ('data', 'fsdp')),
    ('embed', None),
  )


def test_stage1_specs():
  rules = parallel.normalize_rules(common.logical_axis_rules())
  state = {
    'params': {
      'enc': {
        'conv': {
          'kernel': jax.ShapeDtypeStruct((3, 3, 64, 128), np.float32),
          'bias': jax.ShapeDtypeStruct((128,), np.float32),
        },
        'odd': {'kernel': jax.ShapeDtypeStruct((3, 3, 512, 3), np.float32)},
        'q': {'kernel': jax.ShapeDtypeStruct((256, 256), np.float32)},
      },
      'quantize': {'embedding': {'embedding': jax.ShapeDtypeStruct((1024, 256), np.float32)}},
    }
  }
  spec = lambda sh: jax.tree.map(
    lambda s: tuple(s.spec), sh, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
  )

  # tensor=1: exactly plain ZeRO-3, the largest divisible dimension over fsdp.
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 4})
  plain = spec(parallel.state_shardings(state, mesh))
  assert spec(parallel.state_shardings(state, mesh, rules)) == plain
  p = plain['params']
  assert p['enc']['conv']['kernel'] == (None, None, None, 'fsdp')
  assert p['enc']['conv']['bias'] == ()  # small arrays replicated
  assert p['enc']['q']['kernel'] == ('fsdp', None)
  assert p['quantize']['embedding']['embedding'] == ('fsdp', None)

  # tensor=2: output channels over tensor, fsdp on the largest remaining dimension.
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  p = spec(parallel.state_shardings(state, mesh, rules))['params']
  assert p['enc']['conv']['kernel'] == (None, None, 'fsdp', 'tensor')
  assert p['enc']['odd']['kernel'] == (None, None, 'fsdp', None)  # 3 outputs: not over tensor
  assert p['enc']['q']['kernel'] == ('fsdp', 'tensor')
  assert p['quantize']['embedding']['embedding'] == ('fsdp', None)  # codebook -> None
  assert p['enc']['conv']['bias'] == ()

  # The table decides: conv_in on fsdp (no automatic choice), conv_out replicated.
  custom = (('conv_in', 'fsdp'), ('conv_out', None), ('codebook', ('fsdp', 'tensor')))
  p = spec(parallel.state_shardings(state, mesh, custom))['params']
  assert p['enc']['conv']['kernel'] == (None, None, 'fsdp', None)
  assert p['quantize']['embedding']['embedding'] == (('fsdp', 'tensor'), None)
  # Optimizer moments mirror their params: the rule reads the leaf name and shape only.
  assert parallel.stage1_logical_axes(
    (jax.tree_util.GetAttrKey('mu'), jax.tree_util.DictKey('kernel')), (3, 3, 8, 8)
  ) == (None, None, 'conv_in', 'conv_out')


def test_stage1_config_table_drives_the_state_shardings():
  config = fashion_mnist_vqgan.get_config('smoke')
  models = stage1.build_models(config)
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  abstract = jax.eval_shape(lambda r: stage1.init_state(config, models, r), jax.random.PRNGKey(0))
  kernel = lambda sh: tuple(sh['params']['decoder']['mid']['block_1']['conv1']['kernel'].spec)
  mu = lambda sh: tuple(sh['opt_state'][0].mu['decoder']['mid']['block_1']['conv1']['kernel'].spec)
  sh = parallel.state_shardings(abstract, mesh, parallel.axis_rules(config))
  assert kernel(sh) == mu(sh) == (None, None, 'fsdp', 'tensor')
  config.logical_axis_rules = (('conv_out', None),)
  sh = parallel.state_shardings(abstract, mesh, parallel.axis_rules(config))
  assert kernel(sh) == mu(sh) == (None, None, 'fsdp', None)  # cin = cout: the first


def test_stage2_config_table_drives_the_param_shardings():
  config = common_transformer.apply_smoke(common_transformer.stage2_base())
  config.stage1_workdir = ''
  config.stage1_config.update(ch_mult=(1, 2, 2, 2), n_embed=32)
  config.data.image_size = 64
  config.transformer.update(n_layer=2, n_head=2, n_embd=32)
  layout = stage2_config.make_layout(config)
  model = stage2_config.build_model(config, layout)
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  mlp = lambda r: tuple(
    stage2.param_shardings(model, mesh, rules=r)['blocks']['mlp_0']['kernel'].spec
  )
  assert mlp(parallel.axis_rules(config)) == (None, 'fsdp', 'tensor')
  config.logical_axis_rules = tuple(
    (k, None if k == 'mlp' else v) for k, v in config.logical_axis_rules
  )
  assert mlp(parallel.axis_rules(config)) == (None, 'fsdp', None)
  # ... and the activation constraints of the step read the same table.
  fn = stage2.MeshFunction(lambda: None, mesh, parallel.axis_rules(config))
  assert dict(fn.rules)['mlp'] is None and dict(fn.rules)['batch'] == ('data', 'fsdp')
