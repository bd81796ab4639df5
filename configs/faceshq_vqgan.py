"""The paper's FacesHQ VQGAN (CelebA-HQ + FFHQ), f16 with 1024 codes (`faceshq_vqgan.yaml`).

FacesHQ is not a TFDS catalogue dataset: put the 256x256 faces of both sets in one folder
and pass --config.data.folder=DIR (a 5% validation split is held out deterministically).
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
  c.loss.update(disc_start=30001.0, disc_weight=0.8, disc_num_layers=3, codebook_weight=1.0)
  c.optim.base_lr = 4.5e-6  # x batch 3 -> 1.35e-5
  # Center crop (the original's FacesHQ random crop at 256 of 256 is a no-op).
  c.data.update(
    name='folder',
    folder='',
    image_size=256,
    train_split='train',
    eval_split='validation',
    random_crop=False,
  )
  c.train.update(batch_size=3, eval_batch_size=8)
  if args.get('smoke'):
    base.stage1_smoke(c)
  return c
