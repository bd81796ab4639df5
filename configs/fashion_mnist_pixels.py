"""The pixel first stage (f = 1) on Fashion-MNIST: k-means over pixel values (the original's
f = 1 baseline, Image GPT's palette), so each 32x32 image is 32x32 codes. Its training is the
k-means fit (seconds); the workdir then serves --mode=encode, stage 2 and the loaders as any
stage-1 run.

python -m vqgan_jax.main --config=configs/fashion_mnist_pixels.py --workdir=workdirs/fm_pixels
python -m vqgan_jax.main --config=configs/fashion_mnist_pixels.py:smoke --workdir=/tmp/px

`:k=32` sets the number of centres (default 16; the paper's RGB model has 512).
"""

from vqgan_jax import config_base as base


def get_config(arg=None):
  args = base.parse_arg(arg)
  c = base.stage1_base()
  k = int(args.get('k', 16))
  # f = 1 (one ch_mult entry); the encoder/decoder fields are unused (no such modules) but
  # kept valid. A centre is an RGB value (the grey images read as RGB, as every demo's).
  c.model.update(
    quantizer='kmeans',
    ch=32,
    ch_mult=(1,),
    num_res_blocks=1,
    attn_resolutions=(),
    resolution=32,
    z_channels=3,
    n_embed=k,
    embed_dim=3,
  )
  c.data.update(base.fashion_mnist_data())
  # 200 mini-batches of 64 images (13M pixels, ~0.2 epoch) after k-means++ seeding on one.
  c.train.update(
    batch_size=64,
    eval_batch_size=250,
    num_steps=200,
    log_every=25,
    eval_every=200,
    checkpoint_every=200,
    num_grid_images=32,
  )
  if args.get('smoke'):
    c.data.update(base.fashion_mnist_data(eval_examples=64), image_size=16)
    c.model.resolution = 16
    c.train.update(
      batch_size=8, eval_batch_size=32, num_steps=4, log_every=2, eval_every=4, checkpoint_every=2
    )
    c.train.num_grid_images = 8
  return c
