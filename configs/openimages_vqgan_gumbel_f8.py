"""The released Gumbel VQGAN, OpenImages f8 with 8192 codes (`vqgan_gumbel_f8` model.yaml).

taming `GumbelVQ`: the f16 architecture with one level less (ch_mult 1,1,2,4, attention at
32x32), a GumbelQuantize (1x1 `proj` to 8192 logits, `embed` table 8192x256), embed_dim =
z_channels = 256, kl_weight 1e-8. 256x256 images -> 32x32 = 1024 codes. Reconstruction FID
(val) reported by the original: 1.49.

Its use here is to hold the converted release and to fine-tune it:

  python -m vqgan_jax.convert taming --ckpt vqgan_gumbel_f8/ckpts/last.ckpt \
      --config vqgan_gumbel_f8/configs/model.yaml --out workdirs/gumbel_f8
  python -m vqgan_jax.main --config=configs/openimages_vqgan_gumbel_f8.py \
      --workdir=workdirs/gumbel_f8_ft --config.init_from=workdirs/gumbel_f8

Encoding is deterministic here (argmax of the logits); the original adds Gumbel noise even at
inference (see README). The release anneals the training temperature with a cosine from 0.9
to 1e-6 over 1,000,001 steps; our training uses the constant `model.temperature` (0.9 here,
the schedule's start; the converter writes the schedule's value at the checkpoint's step).
The release's yaml names a DummyLoss, so its discriminator/loss settings are not published:
the loss fields below are the ImageNet VQGAN's. Data: any prepared TFDS image dataset with an
'image' feature (the release trained on OpenImages, TFDS `open_images_v4`).
"""

from vqgan_jax import config_base as base


def get_config(arg=None):
  args = base.parse_arg(arg)
  c = base.stage1_base()
  c.model.update(
    ch=128,
    ch_mult=(1, 1, 2, 4),
    num_res_blocks=2,
    attn_resolutions=(32,),
    resolution=256,
    z_channels=256,
    n_embed=8192,
    embed_dim=256,
    quantizer='gumbel',
    kl_weight=1e-8,
    temperature=0.9,
  )
  c.loss.update(disc_start=250001.0, disc_weight=0.8, disc_num_layers=3, codebook_weight=1.0)
  c.optim.base_lr = 4.5e-6
  c.data.update(
    name='open_images_v4',
    image_size=256,
    train_split='train',
    eval_split='validation',
    random_crop=True,
  )
  c.train.update(batch_size=12, eval_batch_size=16, dtype='float32')
  if args.get('smoke'):
    base.stage1_smoke(c)
    c.model.update(embed_dim=c.model.z_channels)
  return c
