"""The released ImageNet VQGAN, f16 with 16384 codes (`vqgan_imagenet_f16_16384` model.yaml).

The release's config: disc_start 0, disc_weight 0.75, a 2-layer discriminator. Its batch size
is not published; 12 is the original's ImageNet default. Reconstruction FID (val): 4.98.
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
    n_embed=16384,
    embed_dim=256,
  )
  c.loss.update(disc_start=0.0, disc_weight=0.75, disc_num_layers=2, codebook_weight=1.0)
  c.optim.base_lr = 4.5e-6
  c.data.update(
    name='imagenet2012',
    image_size=256,
    train_split='train',
    eval_split='validation',
    random_crop=True,
  )
  c.train.update(batch_size=12, eval_batch_size=16)
  if args.get('smoke'):
    base.stage1_smoke(c)
  return c
