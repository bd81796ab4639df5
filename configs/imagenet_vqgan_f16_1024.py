"""The paper's ImageNet VQGAN, f16 with 1024 codes (taming `configs/imagenet_vqgan.yaml`).

Needs a prepared TFDS `imagenet2012` (manual download) under config.data.data_dir.
Reconstruction FID reported by the original: 7.94 (val).
"""

from vqgan_jax import config_base as base


def get_config(arg=None):
  args = base.parse_arg(arg)
  c = base.stage1_base()
  c.model.update(
    ch=128,
    ch_mult=(1, 1, 2, 2, 4),
    num_res_blocks=2,
    attn_resolutions=(16,),
    resolution=256,
    z_channels=256,
    n_embed=1024,
    embed_dim=256,
  )
  c.loss.update(disc_start=250001.0, disc_weight=0.8, disc_num_layers=3, codebook_weight=1.0)
  c.optim.base_lr = 4.5e-6  # x global batch 12 -> 5.4e-5, as the original on one GPU
  c.data.update(
    name='imagenet2012',
    image_size=256,
    train_split='train',
    eval_split='validation',
    random_crop=True,
  )
  c.train.update(batch_size=12, eval_batch_size=16, dtype='float32')
  if args.get('smoke'):
    base.stage1_smoke(c)
  return c
