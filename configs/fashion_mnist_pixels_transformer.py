"""A class-conditional GPT over the pixel first stage's codes (f = 1, k-means), trained on 8x8
windows of the 32x32 code grid as the original trains on crops of its high-resolution images;
--mode=sample and --mode=eval draw whole 32x32 images with the sliding window.

  python -m vqgan_jax.main --config=configs/fashion_mnist_pixels.py --workdir=workdirs/fm_pixels
  cfg=configs/fashion_mnist_pixels_transformer.py
  python -m vqgan_jax.main --config=$cfg --workdir=workdirs/fm_pixels_gpt --mode=encode
  python -m vqgan_jax.main --config=$cfg --workdir=workdirs/fm_pixels_gpt
  python -m vqgan_jax.main --config=$cfg --workdir=workdirs/fm_pixels_gpt --mode=sample

The GPT, its steps and sampling are the demo's (configs/fashion_mnist_transformer.py); only
its first stage and the window differ. `:smoke` pairs with configs/fashion_mnist_pixels.py:smoke
(16x16 images, workdir workdirs/fashion_mnist_pixels_smoke): a tiny GPT on 8x8 windows of the
16x16 grid.
"""

from vqgan_jax import config_base as base

pixels = base.load_sibling(__file__, 'fashion_mnist_pixels')
demo = base.load_sibling(__file__, 'fashion_mnist_transformer')


def get_config(arg=None):
  args = base.parse_arg(arg)
  smoke = bool(args.get('smoke'))
  c = demo.get_config('smoke' if smoke else None)
  stage1 = pixels.get_config('smoke' if smoke else None)
  c.stage1_workdir = 'workdirs/fashion_mnist_pixels' + ('_smoke' if smoke else '')
  c.stage1_config = base.stage1_model_fields(stage1)
  c.data.image_size = stage1.data.image_size
  c.data.crop_codes = int(args.get('crop', 8))
  if smoke:  # 4 steps, one eval, two samples: the plumbing only
    c.train.update(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4, dtype='float32')
    c.transformer.scan_layers = False  # float32 and unrolled compile ~25% faster here
    c.sample.update(classes=(0, 1), num_per_class=1)
  return c
