"""An ImageNet f16 VQGAN with 16384 LlamaGen-style codes, for pod users: the encoder output
is projected to 8 dims and matched by cosine against an l2-normalised codebook (LlamaGen
`vq_ds16_c2i`: rFID 2.19 with 97% codebook usage at this setting, against 4.98 for the
original's 256-dim codes), an EMA of the generator for evaluation, LeCAM on the
discriminator, a fixed adversarial weight instead of the adaptive one, and the GAN from step
20k. The architecture is the released f16/16384 model's, so `init_from` a converted release
is not possible (the quantizer differs) but every other piece of the pipeline is unchanged.
"""

from vqgan_jax import config_base as base

imagenet_vqgan_f16_16384 = base.load_sibling(__file__, 'imagenet_vqgan_f16_16384')


def get_config(arg=None):
  c = imagenet_vqgan_f16_16384.get_config(arg)
  if base.parse_arg(arg).get('smoke'):
    c.model.update(codebook_dim=8, codebook_l2_norm=True)
    return c
  c.model.update(codebook_dim=8, codebook_l2_norm=True, embed_dim=256, beta=0.25)
  c.loss.update(
    disc_start=20000.0,
    disc_weight=0.5,
    adaptive_weight=False,
    lecam_weight=0.05,
    disc_num_layers=3,
  )
  c.train.update(params_ema_decay=0.9999, batch_size=128, eval_batch_size=128)
  c.optim.update(base_lr=1e-4 / 128, b1=0.9, b2=0.95)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
