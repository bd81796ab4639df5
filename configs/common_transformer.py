"""The paper's spatially conditioned transformers (D-RIN, S-FLCKR) share everything but their data.

The stage-2 schema itself (`stage2_base`, `stage1_model_fields`, `stage2_smoke`) lives in the
package, `vqgan_jax/config_base.py`; the names below stay for config files written against
this module.
"""

from vqgan_jax import config_base as base
from vqgan_jax.config_base import stage1_model_fields  # noqa: F401
from vqgan_jax.config_base import stage2_base  # noqa: F401
from vqgan_jax.config_base import stage2_smoke as apply_smoke  # noqa: F401

imagenet_vqgan_f16_1024 = base.load_sibling(__file__, 'imagenet_vqgan_f16_1024')


def spatial_transformer(
  args, *, key, one_hot, cond_channels, data_name, batch_size, smoke_one_hot=0
):
  """The paper's spatially conditioned transformers (D-RIN, S-FLCKR): 24 layers, 16 heads,
  1024 wide, block 512 = the 16x16 codes of the dataset feature `key` under a second, frozen
  VQGAN (`cond_channels` input channels, 1024 codes), then the 16x16 image codes of the
  ImageNet f16 VQGAN with 1024 codes; the original's shared vocabulary (vocab 1024).
  lr = 4.5e-6 x global batch. `smoke_one_hot`: the label count of `:smoke`'s fake map."""
  c = base.stage2_base()
  stage1 = imagenet_vqgan_f16_1024.get_config()
  c.stage1_config = base.stage1_model_fields(stage1)
  cond = base.stage1_base()
  cond.model.update(in_channels=cond_channels, out_ch=cond_channels, n_embed=1024, embed_dim=256)
  c.cond.update(kind='spatial', key=key, one_hot=one_hot, workdir='')
  c.cond.model = base.stage1_model_fields(cond)
  c.transformer.update(n_layer=24, n_head=16, n_embd=1024, block_size=512, shared_vocab=True)
  c.data = stage1.data
  c.data.update(name=data_name, source='codes', codes_dir='', random_crop=False)
  c.optim.base_lr = 4.5e-6
  c.train.update(batch_size=batch_size, eval_batch_size=16, dtype='bfloat16')
  c.sample.update(top_k=100, temperature=1.0, num_samples=8)
  if args.get('smoke'):
    c.cond.one_hot = smoke_one_hot
    base.stage2_smoke(c)
    c.transformer.block_size = -1
    c.train.dtype = 'float32'
  return c
