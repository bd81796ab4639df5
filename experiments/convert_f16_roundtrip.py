"""Round trip of the f16 ImageNet VQGAN through the converter, against the original.

A random-init original VQModel with the released f16 architecture (ch 128, ch_mult
1,1,2,2,4, 2 res blocks, attention at 16, z 256, embed_dim 256, n_embed 16384, 2-layer
discriminator, LPIPS) is saved as a Lightning-style `.ckpt` + yaml in a temporary directory,
converted with `python -m vqgan_jax.convert taming` (in process, timed), and the original
forward is compared with ours (params restored from the written checkpoint) on the same
256x256 inputs. Prints one JSON line.

  python experiments/convert_f16_roundtrip.py [--batch 1] [--keep DIR]

Needs the [reference] extra (pip install -e '.[reference]' -c reference-constraints.txt).

Recorded 2026-11-26 (2 shared cores, load average ~7, batch 1, astronaut photo):
  ckpt 934.7 MB (state_dict 349 MB: 392 keys = encoder 144, decoder 194, loss 49, other 5;
  plus both Adam states as in a Lightning training checkpoint), conversion 11.6 s end to end
  (torch.load 1.2 s), xrec max abs err 1.7e-5 (max |xrec| 2.05), qloss abs err 7.5e-9,
  code indices 256/256 equal (228 of them near-ties, distance gap <= 1e-4: random-init
  codebooks are tiny), original forward 14.0 s, ours 6.9 s (10.5 s first call).
"""

import argparse
import os
import shutil
import tempfile
import time

import machine
import numpy as np

DDCONFIG = dict(
  ch=128,
  ch_mult=[1, 1, 2, 2, 4],
  num_res_blocks=2,
  attn_resolutions=[16],
  resolution=256,
  z_channels=256,
  double_z=False,
  in_channels=3,
  out_ch=3,
  dropout=0.0,
)
N_EMBED, EMBED_DIM = 16384, 256
# The released vqgan_imagenet_f16_16384 loss settings.
LOSS = dict(
  disc_conditional=False,
  disc_in_channels=3,
  disc_start=0,
  disc_weight=0.75,
  disc_num_layers=2,
  codebook_weight=1.0,
)


def _images(batch, size=256):
  """Real photos from scikit-image when installed, else smooth noise; NHWC in [-1, 1]."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from skimage import data  # pylint: disable=g-import-not-at-top

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for im in photos[:batch]:
      h, w = im.shape[:2]
      s = min(h, w)
      im = im[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
      out.append(np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)))
    x = np.stack(out).astype(np.float32)
    source = 'skimage'
  except ImportError:
    rng = np.random.default_rng(0)
    low = rng.uniform(0, 255, (batch, size // 16, size // 16, 3))
    x = low.repeat(16, 1).repeat(16, 2) + rng.normal(0, 10, (batch, size, size, 3))
    source = 'noise'
  return np.clip(x, 0, 255) / 127.5 - 1.0, source


def _adam_state_dict(torch, params, lr=4.5e-6):
  """What torch.optim.Adam(betas=(0.5, 0.9)).state_dict() holds after some steps (zeros)."""
  return {
    'state': {
      i: {
        'step': torch.tensor(1.0),
        'exp_avg': torch.zeros_like(p),
        'exp_avg_sq': torch.zeros_like(p),
      }
      for i, p in enumerate(params)
    },
    'param_groups': [
      {
        'lr': lr,
        'betas': (0.5, 0.9),
        'eps': 1e-8,
        'weight_decay': 0,
        'amsgrad': False,
        'params': list(range(len(params))),
      }
    ],
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--keep', default='', help='keep the ckpt/yaml/converted dir here')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument(
    '--out',
    default='convert_f16_roundtrip.jsonl',
    help='results file under experiments/results/ (or a path); empty: print only',
  )
  parser.add_argument(
    '--no_optimizer_states',
    action='store_true',
    help='save only the state_dict (the release also holds both Adam states)',
  )
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  import yaml  # pylint: disable=g-import-not-at-top

  from vqgan_jax.testing import reference as R  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  R.install_torchvision_standin()
  root = args.keep or tempfile.mkdtemp(prefix='convert_f16_')
  os.makedirs(root, exist_ok=True)
  try:
    t0 = time.perf_counter()
    model = R.build_vqmodel(DDCONFIG, N_EMBED, EMBED_DIM, LOSS, seed=0).eval()
    sd = model.state_dict()
    groups = {}
    for k in sd:
      g = k.split('.')[0] if k.split('.')[0] in ('encoder', 'decoder', 'loss') else 'other'
      groups[g] = groups.get(g, 0) + 1
    ckpt = os.path.join(root, 'model.ckpt')
    blob = {'state_dict': sd, 'global_step': 0, 'epoch': 0}
    if not args.no_optimizer_states:  # as a Lightning training checkpoint: ~1 GB at f16
      ae = [p for n, p in model.named_parameters() if not n.startswith('loss.')]
      blob['optimizer_states'] = [
        _adam_state_dict(torch, ae),
        _adam_state_dict(torch, list(model.loss.discriminator.parameters())),
      ]
      blob['lr_schedulers'] = []
    torch.save(blob, ckpt)
    with open(os.path.join(root, 'model.yaml'), 'w') as f:
      yaml.safe_dump(
        {
          'model': {
            'base_learning_rate': 4.5e-6,
            'target': 'taming.models.vqgan.VQModel',
            'params': {
              'embed_dim': EMBED_DIM,
              'n_embed': N_EMBED,
              'ddconfig': DDCONFIG,
              'lossconfig': {'target': R.VQLPIPS_TARGET, 'params': LOSS},
            },
          }
        },
        f,
      )
    build_s = time.perf_counter() - t0

    # The CLI's work, timed end to end (torch.load of the .ckpt included).
    from vqgan_jax.convert import taming as convert  # pylint: disable=g-import-not-at-top
    from vqgan_jax.convert import yaml_config  # pylint: disable=g-import-not-at-top

    out = os.path.join(root, 'converted')
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = convert.convert_taming_checkpoint(ckpt, os.path.join(root, 'model.yaml'), out)
    convert_s = time.perf_counter() - t0

    x, source = _images(args.batch)
    t0 = time.perf_counter()
    with torch.no_grad():
      xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32))
      h = model.quant_conv(model.encoder(xt))
      _, _, (_, _, ind_t) = model.quantize(h)
      xrec_t, qloss_t = model(xt)
    torch_s = time.perf_counter() - t0
    h = h.numpy().transpose(0, 2, 3, 1).reshape(-1, EMBED_DIM).astype(np.float64)
    e = model.quantize.embedding.weight.detach().numpy().astype(np.float64)
    d = (h**2).sum(1, keepdims=True) + (e**2).sum(1) - 2 * h @ e.T
    d.sort(axis=1)
    gap = d[:, 1] - d[:, 0]

    import jax  # pylint: disable=g-import-not-at-top

    from vqgan_jax import checkpoints  # pylint: disable=g-import-not-at-top
    from vqgan_jax.train import stage1  # pylint: disable=g-import-not-at-top

    config = yaml_config.stage1_config(
      DDCONFIG, N_EMBED, EMBED_DIM, {'target': R.VQLPIPS_TARGET, 'params': LOSS}
    )
    models = stage1.build_models(config)
    abstract = jax.eval_shape(lambda r: stage1.init_state(config, models, r), jax.random.PRNGKey(0))
    params = checkpoints.restore_params(out, checkpoints.abstract_like(abstract['params']))
    fwd = jax.jit(lambda p, x: models.vqgan.apply({'params': p}, x))
    t0 = time.perf_counter()
    xrec, qloss, ind = jax.block_until_ready(fwd(params, x))
    jax_first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(params, x))
    jax_s = time.perf_counter() - t0

    ind = np.asarray(ind).reshape(-1)
    ind_t = ind_t.numpy().reshape(-1)
    clear = gap > 1e-4
    same = ind == ind_t
    xrec_t = xrec_t.numpy().transpose(0, 2, 3, 1)
    result = {
      'what': 'f16 ImageNet VQGAN (n_embed 16384, 2-layer D) original -> ours, float32',
      'inputs': f'{args.batch}x256x256 ({source})',
      'ckpt_mb': round(os.path.getsize(ckpt) / 2**20, 1),
      'ckpt_has_optimizer_states': not args.no_optimizer_states,
      'ckpt_keys': len(sd),
      'ckpt_keys_by_module': groups,
      'convert_seconds': round(convert_s, 2),
      'convert_read_seconds': summary['read_seconds'],
      'params': summary['params'],
      'disc_params': summary['disc_params'],
      'lpips_params': summary['lpips_params'],
      'xrec_max_abs_err': float(np.max(np.abs(np.asarray(xrec) - xrec_t))),
      'xrec_max_abs': float(np.max(np.abs(xrec_t))),
      'qloss_abs_err': float(abs(float(qloss) - float(qloss_t))),
      'qloss': float(qloss_t),
      'index_agreement': float(same.mean()),
      'index_agreement_clear_gap': float(same[clear].mean()) if clear.any() else None,
      'near_ties': int((~clear).sum()),
      'codes': int(same.size),
      'original_forward_seconds': round(torch_s, 2),
      'ours_forward_seconds': round(jax_s, 2),
      'ours_first_call_seconds': round(jax_first_s, 2),
      'build_and_save_original_seconds': round(build_s, 2),
      'load_average': [round(v, 2) for v in os.getloadavg()],
    }
    machine.write_row(args.out, result)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
