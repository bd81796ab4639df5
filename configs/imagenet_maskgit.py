"""MaskGIT's class-conditional ImageNet 256 transformer (Chang et al. 2022) over our codes.

24 layers, 16 heads, 768 wide over 1 class token + the 16x16 codes of the f16 VQGAN with 1024
codes (`configs/imagenet_vqgan_f16_1024.py`, MaskGIT's codebook size); offset vocabulary:
1024 codes, 1000 classes, a null class (class dropout 0.1 for classifier-free guidance) and the
[MASK] id = 2026 ids, 257 positions. Training as the paper: AdamW (0.9, 0.96), lr 1e-4 (not
scaled by the batch) with 5000 warm-up steps and cosine decay, weight decay 0.045, dropout
0.1, label smoothing 0.1, batch 256, bf16 matmuls. Decoding: T = 8 iterations (8-12 in the paper),
cosine schedule, choice temperature 4.5.

  python -m vqgan_jax.main --config=configs/imagenet_maskgit.py --workdir=W \
      --config.stage1_workdir=IMAGENET_VQGAN_WORKDIR --mode=encode   # then train, sample
  python -m vqgan_jax.plan --config=configs/imagenet_maskgit.py --mesh=data=16,fsdp=4
"""

from vqgan_jax import config_base as base

imagenet_vqgan_f16_1024 = base.load_sibling(__file__, 'imagenet_vqgan_f16_1024')


def get_config(arg=None):
  args = base.parse_arg(arg)
  c = base.stage2_base()
  stage1 = imagenet_vqgan_f16_1024.get_config()
  c.stage1_config = base.stage1_model_fields(stage1)
  c.cond.update(kind='class', n_classes=1000, drop_prob=0.1)
  c.transformer.update(
    kind='maskgit',
    n_layer=24,
    n_head=16,
    n_embd=768,
    shared_vocab=False,
    label_smoothing=0.1,
    embd_pdrop=0.1,
    resid_pdrop=0.1,
    attn_pdrop=0.1,
  )
  c.data = stage1.data
  c.data.update(source='codes', codes_dir='', random_crop=False)
  c.optim.update(
    base_lr=1e-4,
    scale_lr=False,
    b1=0.9,
    b2=0.96,
    weight_decay=0.045,
    warmup_steps=5000,
    schedule='cosine',
  )
  c.train.update(
    batch_size=256, eval_batch_size=256, num_steps=1_500_000, dtype='bfloat16', log_every=100
  )
  c.sample.update(
    iterations=8,
    schedule='cosine',
    choice_temperature=4.5,
    temperature=1.0,
    top_k=0,
    cfg_scale=1.0,
    num_per_class=8,
    classes=(1, 9, 88, 207, 279, 388, 417, 980),
  )
  if args.get('smoke'):
    base.stage2_smoke(c)
    c.transformer.update(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    c.optim.update(base_lr=1e-5, scale_lr=True)
    c.train.dtype = 'float32'
    c.sample.update(classes=None, top_k=0)
  return c
