"""The taming checkpoint converter: the table, its errors, the CLI's output, fine-tuning.

The numpy core is tested without torch (round trip through the inverse table); reading a
Lightning .ckpt and the Net2NetTransformer layout need the [reference] extra and are skipped
without it. Numerical parity of the converted models, and fine-tuning a converted original
model on Fashion-MNIST (it reuses that module's compiled train step), are in
test_parity_stage1.py.
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import checkpoints
from vqgan_jax.convert import ConversionError
from vqgan_jax.convert import __main__ as cli
from vqgan_jax.convert import param_mapping
from vqgan_jax.convert import taming as convert
from vqgan_jax.convert import torch_ckpt
from vqgan_jax.convert import yaml_config
from vqgan_jax.models import lpips as lpips_lib
from vqgan_jax.train import stage1

_HINT = f'the original implementation is not installed: {torch_ckpt.INSTALL_HINT}'

# The spec's exhaustive small example (taming-spec g.2), with a 2-layer D of ndf 16.
DDCONFIG = dict(
  ch=32,
  ch_mult=[1, 2],
  num_res_blocks=1,
  attn_resolutions=[16],
  resolution=32,
  z_channels=16,
  double_z=False,
  in_channels=3,
  out_ch=3,
  dropout=0.0,
)
N_EMBED, EMBED_DIM = 32, 8
LOSS = dict(disc_start=0, disc_weight=0.8, disc_num_layers=2, disc_ndf=16)


def _random_like(tree, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), tree)


@pytest.fixture(scope='module')
def synthetic():
  """A torch-layout VQModel state dict (numpy) made from random params of our own shapes."""
  kw = yaml_config.model_fields(DDCONFIG, N_EMBED, EMBED_DIM)
  params = _random_like(param_mapping.abstract_vqgan(kw)['params'])
  d = param_mapping.abstract_disc(2, 16, 3, 32)
  trees = {
    'params': params,
    'disc_params': _random_like(d['params'], 1),
    'disc_stats': _random_like(d['batch_stats'], 2),
    'lpips_params': lpips_lib.load_pretrained_params(),
  }
  sd = param_mapping.vqmodel_to_torch_state_dict(trees)
  # Buffers a real checkpoint carries that hold nothing of ours.
  sd['loss.discriminator.main.3.num_batches_tracked'] = np.asarray(1)
  sd['loss.discriminator.main.6.num_batches_tracked'] = np.asarray(1)
  sd['loss.perceptual_loss.scaling_layer.shift'] = np.zeros((1, 3, 1, 1), np.float32)
  sd['loss.perceptual_loss.scaling_layer.scale'] = np.ones((1, 3, 1, 1), np.float32)
  return trees, sd


def test_table_names_and_shapes_follow_the_spec(synthetic):
  _, sd = synthetic
  expected = {  # taming-spec g.2
    'encoder.conv_in.weight': (32, 3, 3, 3),
    'encoder.down.0.downsample.conv.weight': (32, 32, 3, 3),
    'encoder.down.1.block.0.nin_shortcut.weight': (64, 32, 1, 1),
    'encoder.down.1.attn.0.q.weight': (64, 64, 1, 1),
    'encoder.mid.attn_1.proj_out.bias': (64,),
    'encoder.mid.block_2.conv2.weight': (64, 64, 3, 3),
    'encoder.conv_out.weight': (16, 64, 3, 3),
    'decoder.up.0.block.0.nin_shortcut.weight': (32, 64, 1, 1),
    'decoder.up.1.attn.1.norm.weight': (64,),
    'decoder.up.1.upsample.conv.weight': (64, 64, 3, 3),
    'decoder.conv_out.weight': (3, 32, 3, 3),
    'quantize.embedding.weight': (32, 8),
    'quant_conv.weight': (8, 16, 1, 1),
    'post_quant_conv.weight': (16, 8, 1, 1),
    'loss.discriminator.main.0.bias': (16,),
    'loss.discriminator.main.3.running_var': (32,),
    'loss.discriminator.main.8.weight': (1, 64, 4, 4),
    'loss.perceptual_loss.net.slice3.14.weight': (256, 256, 3, 3),
    'loss.perceptual_loss.lin4.model.1.weight': (1, 512, 1, 1),
  }
  for k, shape in expected.items():
    assert sd[k].shape == shape, k
  assert 'loss.discriminator.main.2.bias' not in sd  # no bias before BatchNorm
  n_ae = sum(1 for k in sd if not k.startswith('loss.'))
  assert n_ae == 155  # 62 encoder + 88 decoder + 5 quantizer/convs for this config


def test_numpy_round_trip(synthetic):
  trees, sd = synthetic
  out = convert.convert_vqmodel_state_dict(sd, DDCONFIG, N_EMBED, EMBED_DIM)
  assert set(out) == {'params', 'disc_params', 'disc_stats', 'lpips_params'}
  jax.tree.map(np.testing.assert_array_equal, out, trees)
  # Attention q/k/v/proj_out are Dense kernels: torch weight[:, :, 0, 0].T.
  np.testing.assert_array_equal(
    out['params']['encoder']['mid']['attn_1']['q']['kernel'],
    sd['encoder.mid.attn_1.q.weight'][:, :, 0, 0].T,
  )
  np.testing.assert_array_equal(
    out['params']['decoder']['conv_in']['kernel'],
    sd['decoder.conv_in.weight'].transpose(2, 3, 1, 0),
  )
  # Without the loss keys (a DummyLoss model), or when told to drop them: params only.
  no_loss = {k: v for k, v in sd.items() if not k.startswith('loss.')}
  assert set(convert.convert_vqmodel_state_dict(no_loss, DDCONFIG, N_EMBED, EMBED_DIM)) == {
    'params'
  }
  assert set(
    convert.convert_vqmodel_state_dict(sd, DDCONFIG, N_EMBED, EMBED_DIM, with_loss=False)
  ) == {'params'}


def test_one_error_names_every_bad_key(synthetic):
  _, sd = synthetic
  bad = dict(sd)
  bad['encoder.extra.weight'] = np.zeros(3, np.float32)
  bad['loss.discriminator.main.99.weight'] = np.zeros((1, 1, 4, 4), np.float32)
  del bad['decoder.up.1.attn.0.k.bias']
  bad['quant_conv.weight'] = np.zeros((8, 15, 1, 1), np.float32)
  with pytest.raises(ConversionError) as e:
    convert.convert_vqmodel_state_dict(bad, DDCONFIG, N_EMBED, EMBED_DIM)
  msg = str(e.value)
  for needle in (
    'encoder.extra.weight',
    'loss.discriminator.main.99.weight',
    'missing key decoder.up.1.attn.0.k.bias',
    'quant_conv.weight: shape (8, 15, 1, 1) does not fit params/quant_conv/kernel (1, 1, 16, 8)',
  ):
    assert needle in msg, msg
  # A wrong config is a wall of shape mismatches, named as such.
  with pytest.raises(ConversionError, match='encoder.conv_out.weight: shape'):
    convert.convert_vqmodel_state_dict(sd, dict(DDCONFIG, z_channels=32), N_EMBED, EMBED_DIM)


def test_gumbel_and_actnorm_are_refused_clearly(synthetic):
  _, sd = synthetic
  gumbel = {k: v for k, v in sd.items() if not k.startswith('quantize.')}
  gumbel['quantize.proj.weight'] = np.zeros((N_EMBED, 16, 1, 1), np.float32)
  gumbel['quantize.proj.bias'] = np.zeros((N_EMBED,), np.float32)
  gumbel['quantize.embed.weight'] = np.zeros((N_EMBED, EMBED_DIM), np.float32)
  with pytest.raises(
    ConversionError,
    match=r'GumbelVQ state dict.*quantize\.embed\.weight, '
    r"quantize\.proj\.bias, quantize\.proj\.weight.*quantizer='gumbel'",
  ):
    convert.convert_vqmodel_state_dict(gumbel, DDCONFIG, N_EMBED, EMBED_DIM)
  # As a GumbelVQ it converts (embed_dim == z_channels, as the original requires) ...
  gumbel['quantize.proj.weight'] = np.zeros((N_EMBED, 16, 1, 1), np.float32)
  gumbel['quantize.embed.weight'] = np.zeros((N_EMBED, 16), np.float32)
  gumbel['quant_conv.weight'] = np.zeros((16, 16, 1, 1), np.float32)
  gumbel['quant_conv.bias'] = np.zeros((16,), np.float32)
  gumbel['post_quant_conv.weight'] = np.zeros((16, 16, 1, 1), np.float32)
  out = convert.convert_vqmodel_state_dict(gumbel, DDCONFIG, N_EMBED, 16, quantizer='gumbel')
  assert out['params']['quantize']['proj']['kernel'].shape == (16, N_EMBED)
  # ... and a VQModel state dict is not one.
  with pytest.raises(ConversionError, match='VectorQuantizer2 codebook'):
    convert.convert_vqmodel_state_dict(sd, DDCONFIG, N_EMBED, EMBED_DIM, quantizer='gumbel')
  actnorm = dict(sd)
  actnorm['loss.discriminator.main.3.loc'] = np.zeros((1, 32, 1, 1), np.float32)
  with pytest.raises(ConversionError, match='ActNorm.*main.3.loc'):
    convert.convert_vqmodel_state_dict(actnorm, DDCONFIG, N_EMBED, EMBED_DIM)


# The released vqgan_gumbel_f8's model.yaml `params` (taming issue #67).
GUMBEL_F8 = {
  'kl_weight': 1.0e-08,
  'embed_dim': 256,
  'n_embed': 8192,
  'monitor': 'val/rec_loss',
  'temperature_scheduler_config': {
    'target': 'taming.lr_scheduler.LambdaWarmUpCosineScheduler',
    'params': {
      'warm_up_steps': 0,
      'max_decay_steps': 1000001,
      'lr_start': 0.9,
      'lr_max': 0.9,
      'lr_min': 1.0e-06,
    },
  },
  'ddconfig': {
    'double_z': False,
    'z_channels': 256,
    'resolution': 256,
    'in_channels': 3,
    'out_ch': 3,
    'ch': 128,
    'ch_mult': [1, 1, 2, 4],
    'num_res_blocks': 2,
    'attn_resolutions': [32],
    'dropout': 0.0,
  },
  'lossconfig': {'target': 'taming.modules.losses.vqperceptual.DummyLoss'},
}


def test_gumbel_f8_release_config():
  """The converter's reading of the release's yaml is configs/openimages_vqgan_gumbel_f8.py."""
  from configs import openimages_vqgan_gumbel_f8  # pylint: disable=g-import-not-at-top
  from vqgan_jax import validate  # pylint: disable=g-import-not-at-top

  q = yaml_config.quantizer_fields(yaml_config.GUMBEL_TARGET, GUMBEL_F8, step=0)
  assert q == {'quantizer': 'gumbel', 'kl_weight': 1e-8, 'temperature': 0.9}
  got = yaml_config.stage1_config(GUMBEL_F8['ddconfig'], 8192, 256, GUMBEL_F8['lossconfig'], **q)
  want = openimages_vqgan_gumbel_f8.get_config()
  assert got.model.to_dict() == want.model.to_dict()
  validate.validate_stage1(want)
  # Its quantizer: proj 256 -> 8192 logits, embed 8192 x 256; 32x32 codes at 256x256.
  kw = yaml_config.model_fields(GUMBEL_F8['ddconfig'], 8192, 256, **q)
  abstract = param_mapping.abstract_vqgan(kw)
  shapes = jax.tree.map(lambda a: a.shape, abstract['params']['quantize'])
  assert shapes == {
    'proj': {'kernel': (256, 8192), 'bias': (8192,)},
    'embed': {'embedding': (8192, 256)},
  }
  # The temperature the original would resume training with (its cosine schedule).
  t = 1e-6 + 0.5 * (0.9 - 1e-6) * (1 + np.cos(np.pi * 500_000 / 1000001))
  assert yaml_config.quantizer_fields(yaml_config.GUMBEL_TARGET, GUMBEL_F8, step=500_000)[
    'temperature'
  ] == pytest.approx(t, rel=1e-12)
  # A yaml without a target is recognised from the state dict's keys.
  assert (
    yaml_config.quantizer_fields(None, {}, {'quantize.proj.weight': 0})['quantizer'] == 'gumbel'
  )
  assert yaml_config.quantizer_fields(None, {}, {'quantize.embedding.weight': 0}) == {
    'quantizer': 'vq'
  }
  smoke = openimages_vqgan_gumbel_f8.get_config('smoke')
  validate.validate_stage1(smoke)
  assert smoke.model.quantizer == 'gumbel' and smoke.model.embed_dim == smoke.model.z_channels
  bad = openimages_vqgan_gumbel_f8.get_config()
  bad.model.quantizer = 'ema'
  with pytest.raises(validate.ConfigError, match='config.model.quantizer must be one of'):
    validate.validate_stage1(bad)


def test_reading_a_ckpt_without_torch_names_the_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)
  (tmp_path / 'model.ckpt').write_bytes(b'PK\x03\x04')  # the file is checked before torch
  hint = r"model\.ckpt needs torch.*pip install -e '\.\[reference\]'"
  with pytest.raises(ImportError, match=hint):
    torch_ckpt.read_lightning_ckpt(str(tmp_path / 'model.ckpt'))


@pytest.mark.parametrize('flag', ['--ckpt', '--config', '--pth'])
def test_a_directory_for_an_input_file_is_named_before_torch(flag, monkeypatch, tmp_path, capsys):
  """A directory given for an input file is named as such, not reported as missing torch
  (torch is installed here: its absence is simulated, a mock)."""
  monkeypatch.setitem(sys.modules, 'torch', None)
  (tmp_path / 'ckpts').mkdir()
  (tmp_path / 'model.yaml').write_text('model:\n  target: taming.models.vqgan.VQModel\n')
  (tmp_path / 'last.ckpt').write_bytes(b'PK\x03\x04')
  paths = {'--ckpt': tmp_path / 'last.ckpt', '--config': tmp_path / 'model.yaml'}
  paths[flag] = tmp_path / 'ckpts'
  if flag == '--pth':
    argv = ['inception', '--pth', str(paths[flag]), '--out', str(tmp_path / 'w.npz')]
  else:
    argv = ['taming', *(str(a) for kv in paths.items() for a in kv), '--out', str(tmp_path / 'o')]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {flag} {tmp_path / "ckpts"} is a directory; pass the file'), err
  assert 'torch' not in err and len(err.splitlines()) == 1, err
  assert sorted(os.listdir(tmp_path)) == ['ckpts', 'last.ckpt', 'model.yaml']


def test_stage1_config_from_the_yaml_fields():
  c = yaml_config.stage1_config(
    DDCONFIG,
    N_EMBED,
    EMBED_DIM,
    {'target': yaml_config.VQLPIPS_TARGET, 'params': LOSS},
    base_lr=1e-5,
  )
  assert c.model.ch_mult == (1, 2) and c.model.attn_resolutions == (16,)
  assert (c.model.z_channels, c.model.n_embed, c.model.embed_dim) == (16, 32, 8)
  assert c.data.image_size == 32 and c.optim.base_lr == 1e-5
  assert (c.loss.disc_num_layers, c.loss.disc_ndf, c.loss.disc_weight) == (2, 16, 0.8)
  assert c.loss.disc_start == 0.0 and isinstance(c.loss.disc_start, float)
  # Fields the yaml leaves out take taming's defaults, not ours.
  c = yaml_config.stage1_config(
    DDCONFIG,
    N_EMBED,
    EMBED_DIM,
    {'target': yaml_config.VQLPIPS_TARGET, 'params': {'disc_start': 10}},
  )
  assert (c.loss.disc_num_layers, c.loss.disc_ndf, c.loss.disc_weight) == (3, 64, 1.0)


# ---------------------------------------------------------------------------------------------
# Lightning checkpoints (need torch and the original code)
# ---------------------------------------------------------------------------------------------


def _reference():
  pytest.importorskip('torch', reason=_HINT)
  pytest.importorskip('taming', reason=_HINT)
  from vqgan_jax.testing import reference as R  # pylint: disable=g-import-not-at-top

  R.install_torchvision_standin()
  pytest.importorskip('pytorch_lightning', reason=_HINT)
  return R


def _write_yaml(path, model):
  import yaml  # pylint: disable=g-import-not-at-top

  with open(path, 'w') as f:
    yaml.safe_dump({'model': model}, f)


def _cli(*args):
  """(exit status, stdout, stderr) of `python -m vqgan_jax.convert taming ARGS`, in process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = cli.main(['taming', *map(str, args)])
  return rc, out.getvalue(), err.getvalue()


def _steps(workdir):
  with checkpoints.Checkpointer(workdir, read_only=True) as ckpt:
    return ckpt.all_steps()


@pytest.fixture(scope='module')
def vqmodel_ckpt(tmp_path_factory):
  """A random-init original VQModel after one training iteration, saved as Lightning 1.0.8
  saves a training checkpoint (optimizer and callback states included) + its yaml."""
  R = _reference()
  d = tmp_path_factory.mktemp('vqmodel')
  model = R.build_vqmodel(DDCONFIG, N_EMBED, EMBED_DIM, LOSS, seed=0)
  optimizers = R.make_optimizers(model)
  x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  R.original_stage1_step(model, optimizers, x, global_step=0, channels_last=True)
  R.save_lightning_ckpt(d / 'last.ckpt', model, global_step=7, epoch=1, optimizers=optimizers)
  _write_yaml(
    d / 'model.yaml',
    {
      'base_learning_rate': 4.5e-6,
      'target': 'taming.models.vqgan.VQModel',
      'params': {
        'embed_dim': EMBED_DIM,
        'n_embed': N_EMBED,
        'ddconfig': DDCONFIG,
        'lossconfig': {'target': yaml_config.VQLPIPS_TARGET, 'params': LOSS},
      },
    },
  )
  return d, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope='module')
def converted_dir(vqmodel_ckpt, tmp_path_factory):
  d, _ = vqmodel_ckpt
  out = tmp_path_factory.mktemp('converted') / 'run'
  rc, printed, _ = _cli('--ckpt', d / 'last.ckpt', '--config', d / 'model.yaml', '--out', out)
  assert rc == 0
  (out.parent / 'summary.txt').write_text(printed)
  return out


def _config_of(out):
  with open(out / 'config.json') as f:
    saved = json.load(f)
  config = yaml_config.stage1_config(
    DDCONFIG, N_EMBED, EMBED_DIM, {'target': yaml_config.VQLPIPS_TARGET, 'params': LOSS}
  )
  return saved, config


def test_cli_writes_a_stage1_workdir(vqmodel_ckpt, converted_dir):
  _, sd = vqmodel_ckpt
  out = converted_dir
  summary = (out.parent / 'summary.txt').read_text()
  assert '"discriminator": "converted"' in summary and 'converted in' in summary
  assert sorted(os.listdir(out)) == ['checkpoints', 'config.json']
  assert sorted(os.listdir(out.parent)) == ['run', 'summary.txt']  # no temporary left behind
  saved, config = _config_of(out)
  assert saved['model']['ch_mult'] == [1, 2] and saved['loss']['disc_ndf'] == 16
  assert saved['converted_from']['global_step'] == 7
  # The step is the original's global_step; the whole training state restores under the
  # config's compatibility check (what resuming in this workdir does) ...
  models = stage1.build_models(config)
  abstract = jax.eval_shape(lambda r: stage1.init_state(config, models, r), jax.random.PRNGKey(0))
  with checkpoints.Checkpointer(out, read_only=True) as ckpt:
    assert ckpt.all_steps() == [7]
    state, _, _ = ckpt.restore(checkpoints.abstract_like(abstract), config=config)
  assert int(state['step']) == 7
  np.testing.assert_array_equal(
    state['params']['encoder']['conv_in']['kernel'],
    sd['encoder.conv_in.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(
    state['disc_stats']['main_3']['var'], sd['loss.discriminator.main.3.running_var']
  )
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(state['opt_state'][0].mu))
  # ... and `init_from` reads its params.
  params = checkpoints.restore_params(out, checkpoints.abstract_like(abstract['params']))
  jax.tree.map(np.testing.assert_array_equal, params, state['params'])


def test_cli_refuses_to_overwrite_and_reports_errors(vqmodel_ckpt, converted_dir, capsys):
  d, _ = vqmodel_ckpt
  args = [
    'taming',
    '--ckpt',
    str(d / 'last.ckpt'),
    '--config',
    str(d / 'model.yaml'),
    '--out',
    str(converted_dir),
  ]
  assert cli.main(args) == 2
  assert 'already holds a checkpoint at step 7' in capsys.readouterr().err
  assert (
    cli.main(
      [
        'taming',
        '--ckpt',
        str(d / 'missing.ckpt'),
        '--config',
        str(d / 'model.yaml'),
        '--out',
        str(d / 'x'),
      ]
    )
    == 2
  )
  assert 'error: --ckpt ' in capsys.readouterr().err


def test_release_layout_loads_with_the_restricted_unpickler(vqmodel_ckpt):
  """A Lightning 1.0.8 training checkpoint names one global beyond torch's safe set, the
  ModelCheckpoint class keying its callback states: the allow-list holds exactly it, and it
  loads as an inert stand-in (pytorch_lightning is not needed to read it)."""
  import torch  # pylint: disable=g-import-not-at-top

  d, sd = vqmodel_ckpt
  path = str(d / 'last.ckpt')
  assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == list(
    torch_ckpt.ALLOWED_GLOBALS
  )
  obj = torch_ckpt.load(path)
  assert list(obj['callbacks']) == [torch_ckpt.LightningCallbackKey]
  assert len(obj['optimizer_states']) == 2 and obj['optimizer_states'][0]['state']
  state_dict, meta = torch_ckpt.read_lightning_ckpt(path)
  assert meta == {'global_step': 7, 'epoch': 1} and set(state_dict) == set(sd)


def test_a_pickle_that_runs_code_is_refused_unless_trusted(vqmodel_ckpt, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top

  d, sd = vqmodel_ckpt
  marker = tmp_path / 'written_by_the_pickle'

  class WritesAFile:
    def __reduce__(self):
      return (open, (str(marker), 'w'))

  evil = tmp_path / 'evil.ckpt'
  torch.save(
    {
      'state_dict': {k: torch.from_numpy(v) for k, v in sd.items()},
      'global_step': 7,
      'hyper_parameters': WritesAFile(),
    },
    evil,
  )
  args = ('--ckpt', evil, '--config', d / 'model.yaml', '--out', tmp_path / 'out')
  rc, _, err = _cli(*args)
  assert rc == 2 and not marker.exists() and not (tmp_path / 'out').exists()
  assert re.fullmatch(
    r'error: \S+evil\.ckpt names \w+\.open in its pickle, which loading would '
    r'import and may run \(no checkpoint of the original release needs that\); '
    r'pass --trust_pickle to load it anyway, only if you trust its source, '
    r'since its pickle can run any code\n',
    err,
  ), err
  rc, _, err = _cli(*args, '--trust_pickle')
  assert rc == 0 and marker.exists(), err
  assert _steps(tmp_path / 'out') == [7]


def test_overwrite_keeps_the_old_workdir_when_the_input_is_bad(
  vqmodel_ckpt, converted_dir, tmp_path
):
  """--overwrite reads and checks everything before it touches --out: a truncated .ckpt
  leaves the earlier conversion whole (and no temporary behind)."""
  d, _ = vqmodel_ckpt
  run = tmp_path / 'run'
  shutil.copytree(converted_dir, run)
  data = (d / 'last.ckpt').read_bytes()
  (tmp_path / 'truncated.ckpt').write_bytes(data[: len(data) // 2])
  rc, _, err = _cli(
    '--ckpt', tmp_path / 'truncated.ckpt', '--config', d / 'model.yaml', '--out', run, '--overwrite'
  )
  assert rc == 2 and 'truncated or damaged zip archive' in err, err
  assert _steps(run) == [7] and sorted(os.listdir(run)) == ['checkpoints', 'config.json']
  assert sorted(os.listdir(tmp_path)) == ['run', 'truncated.ckpt']
  _, config = _config_of(run)
  models = stage1.build_models(config)
  abstract = jax.eval_shape(
    lambda r: stage1.init_state(config, models, r)['params'], jax.random.PRNGKey(0)
  )
  checkpoints.restore_params(run, checkpoints.abstract_like(abstract))


def test_a_workdir_with_a_later_step_is_refused(vqmodel_ckpt, converted_dir, tmp_path):
  """Training and init_from read the latest step: converting step 7 next to a step 9 would
  "succeed" and never be used. --overwrite replaces the checkpoints and keeps other files."""
  d, _ = vqmodel_ckpt
  run = tmp_path / 'run'
  shutil.copytree(converted_dir, run)
  (run / 'notes.txt').write_text('mine')
  ckpt, yml = ('--ckpt', d / 'last.ckpt'), ('--config', d / 'model.yaml')
  assert _cli(*ckpt, *yml, '--out', run, '--step', '9', '--overwrite')[0] == 0
  assert _steps(run) == [9] and (run / 'notes.txt').read_text() == 'mine'
  rc, _, err = _cli(*ckpt, *yml, '--out', run)
  assert rc == 2 and _steps(run) == [9]
  assert err == (
    f'error: {run} already holds a checkpoint at step 9, later than the converted '
    'step 7, which training and init_from would keep using; choose an empty --out '
    'or pass --overwrite to replace them\n'
  )
  assert sorted(os.listdir(tmp_path)) == ['run']


def test_input_that_is_not_a_checkpoint_is_one_sentence(vqmodel_ckpt, tmp_path):
  d, _ = vqmodel_ckpt
  (tmp_path / 'notes.ckpt').write_text('not a checkpoint\n')
  (tmp_path / 'empty.ckpt').write_bytes(b'')
  data = (d / 'last.ckpt').read_bytes()
  (tmp_path / 'cut.ckpt').write_bytes(data[: len(data) - 100])
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'vqgan_jax.convert',
      'taming',
      '--ckpt',
      tmp_path / 'notes.ckpt',
      '--config',
      d / 'model.yaml',
      '--out',
      tmp_path / 'out',
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert proc.stderr.endswith(
    'notes.ckpt is not a readable PyTorch checkpoint: it is neither a zip archive nor a pickle\n'
  ), proc.stderr
  for name, what in (
    ('empty.ckpt', 'the file is empty'),
    ('cut.ckpt', 'it is a truncated or damaged zip archive'),
  ):
    rc, _, err = _cli(
      '--ckpt', tmp_path / name, '--config', d / 'model.yaml', '--out', tmp_path / 'out'
    )
    assert rc == 2 and err.startswith(
      f'error: {tmp_path / name} is not a readable PyTorch checkpoint: {what}'
    ), err
  assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def net2net_ckpt(tmp_path_factory):
  """An unconditional Net2NetTransformer (random init, pos_emb made non-zero): its .ckpt and
  yaml, the torch model, its GPT's and the yaml's params."""
  _reference()
  from taming.models.cond_transformer import Net2NetTransformer  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  d = tmp_path_factory.mktemp('net2net')
  gpt = dict(vocab_size=N_EMBED, block_size=17, n_layer=2, n_head=2, n_embd=32)
  params = {
    'transformer_config': {'target': 'taming.modules.transformer.mingpt.GPT', 'params': gpt},
    'first_stage_config': {
      'target': 'taming.models.vqgan.VQModel',
      'params': {
        'embed_dim': EMBED_DIM,
        'n_embed': N_EMBED,
        'ddconfig': DDCONFIG,
        'lossconfig': {'target': 'taming.modules.losses.vqperceptual.DummyLoss'},
      },
    },
    'cond_stage_config': '__is_unconditional__',
    'first_stage_key': 'image',
  }
  torch.manual_seed(0)
  model = Net2NetTransformer(**params)
  with torch.no_grad():  # pos_emb is zero-initialised: make it count
    model.transformer.pos_emb.normal_(0, 0.02)
  torch.save({'state_dict': model.state_dict(), 'global_step': 3}, d / 'n2n.ckpt')
  _write_yaml(
    d / 'n2n.yaml',
    {
      'base_learning_rate': 4.5e-6,
      'params': params,
      'target': 'taming.models.cond_transformer.Net2NetTransformer',
    },
  )
  return d, model, gpt


def test_yaml_of_another_model_is_one_sentence(vqmodel_ckpt, net2net_ckpt, tmp_path):
  vq, _ = vqmodel_ckpt
  n2n, _, _ = net2net_ckpt
  rc, _, err = _cli('--ckpt', vq / 'last.ckpt', '--config', n2n / 'n2n.yaml', '--out', tmp_path)
  assert rc == 2 and err == (
    f'error: {vq / "last.ckpt"} is a VQModel checkpoint but '
    f'{n2n / "n2n.yaml"} describes a Net2NetTransformer; pass the yaml '
    'that came with the checkpoint\n'
  )
  rc, _, err = _cli('--ckpt', n2n / 'n2n.ckpt', '--config', vq / 'model.yaml', '--out', tmp_path)
  assert rc == 2 and 'n2n.ckpt is a Net2NetTransformer checkpoint but' in err
  assert 'model.yaml describes a VQModel;' in err
  assert os.listdir(tmp_path) == []


def test_net2net_checkpoint(net2net_ckpt, tmp_path):
  """An unconditional Net2NetTransformer: first stage and GPT, both written."""
  import torch  # pylint: disable=g-import-not-at-top

  from vqgan_jax.models import transformer as gpt_lib  # pylint: disable=g-import-not-at-top

  d, model, gpt = net2net_ckpt
  out = tmp_path / 'out'
  assert _cli('--ckpt', d / 'n2n.ckpt', '--config', d / 'n2n.yaml', '--out', out)[0] == 0
  assert sorted(os.listdir(out)) == ['checkpoints', 'config.json', 'first_stage']
  with open(out / 'config.json') as f:
    cfg = json.load(f)
  # A stage-2 workdir: taming's shared vocabulary, per-layer params, the first stage beside it.
  assert cfg['stage'] == 'transformer' and cfg['transformer']['n_layer'] == 2
  assert cfg['transformer']['shared_vocab'] and not cfg['transformer']['scan_layers']
  assert (cfg['transformer']['vocab_size'], cfg['transformer']['block_size']) == (N_EMBED, 17)
  assert cfg['cond']['kind'] == 'unconditional' and cfg['cond']['sos_token'] == 0
  assert cfg['stage1_workdir'] == str(out / 'first_stage')
  assert cfg['stage1_config']['ch_mult'] == [1, 2]
  assert cfg['taming']['permuter'].endswith('permuter.Identity')
  # GPT params: the canonical per-layer layout under 'params'; logits match the original.
  abstract = jax.eval_shape(
    gpt_lib.GPT(**gpt).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), jnp.int32)
  )['params']
  gparams = checkpoints.restore_params(out, checkpoints.abstract_like(gpt_lib.nn.unbox(abstract)))
  tokens = np.random.default_rng(0).integers(0, N_EMBED, (2, 17))
  with torch.no_grad():
    ref, _ = model.transformer(torch.from_numpy(tokens))
  ours = gpt_lib.GPT(**gpt).apply({'params': gparams}, jnp.asarray(tokens))
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4 * float(ref.abs().max()))
  # The first stage is a stage-1 workdir (fresh D: DummyLoss has none).
  config = yaml_config.stage1_config(DDCONFIG, N_EMBED, EMBED_DIM)
  models = stage1.build_models(config)
  abstract = jax.eval_shape(lambda r: stage1.init_state(config, models, r), jax.random.PRNGKey(0))
  fs = checkpoints.restore_params(
    out / 'first_stage', checkpoints.abstract_like(abstract['params'])
  )
  np.testing.assert_array_equal(
    fs['quantize']['embedding']['embedding'],
    model.first_stage_model.quantize.embedding.weight.detach().numpy(),
  )
