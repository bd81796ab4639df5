"""The paper's class-conditional ImageNet transformer (cIN, "1.4B"; taming-spec e.2).

48 layers, 24 heads, 1536 wide, block 256 = 1 class token + 16x16 codes - 1, over the codes of
the f16 VQGAN with 16384 codes (`configs/imagenet_vqgan_f16_16384.py`); the class enters as a
token (taming's `Labelator`). The shared vocabulary (class c is token c, as in the original)
keeps converted checkpoints loadable; vocab = 16384. The batch size of the release is not
published; lr = 4.5e-6 x global batch (taming's rule). Sampling: the README's k=600, p=0.92.

  python -m vqgan_jax.main --config=configs/imagenet_cin_transformer.py --workdir=W \
      --config.stage1_workdir=IMAGENET_VQGAN_WORKDIR --mode=encode   # then train, sample
"""

from vqgan_jax import config_base as base

imagenet_vqgan_f16_16384 = base.load_sibling(__file__, 'imagenet_vqgan_f16_16384')


def get_config(arg=None):
  args = base.parse_arg(arg)
  c = base.stage2_base()
  stage1 = imagenet_vqgan_f16_16384.get_config()
  c.stage1_config = base.stage1_model_fields(stage1)
  c.cond.update(kind='class', n_classes=1000)
  c.transformer.update(n_layer=48, n_head=24, n_embd=1536, shared_vocab=True)
  c.data = stage1.data
  c.data.update(source='codes', codes_dir='', random_crop=False)
  c.optim.base_lr = 4.5e-6
  c.train.update(batch_size=16, eval_batch_size=64, dtype='bfloat16')
  c.sample.update(
    top_k=600,
    top_p=0.92,
    temperature=1.0,
    num_per_class=8,
    classes=(1, 9, 88, 207, 279, 388, 417, 980),
  )
  if args.get('smoke'):
    base.stage2_smoke(c)
    c.train.dtype = 'float32'
    c.sample.classes = None
  return c
