"""The paper's unconditional FFHQ transformer (taming-spec e.2; README FID 9.6).

24 layers, 16 heads, 1664 wide, block 256 = SOS + 16x16 codes - 1, over an f16 VQGAN with 1024
codes (the FacesHQ architecture, `configs/faceshq_vqgan.py`). Unconditional: one SOS token,
id 0 in the original's shared vocabulary (kept so converted checkpoints load; vocab 1024).
Data: a folder of 256x256 faces (--config.data.folder=DIR). The release's batch size is not
published; lr = 4.5e-6 x global batch. Sampling: the README's k=250, p=1.0.
"""

from vqgan_jax import config_base as base

faceshq_vqgan = base.load_sibling(__file__, 'faceshq_vqgan')


def get_config(arg=None):
  args = base.parse_arg(arg)
  c = base.stage2_base()
  stage1 = faceshq_vqgan.get_config()
  c.stage1_config = base.stage1_model_fields(stage1)
  c.cond.update(kind='unconditional', sos_token=0)
  c.transformer.update(n_layer=24, n_head=16, n_embd=1664, shared_vocab=True)
  c.data = stage1.data
  c.data.update(source='codes', codes_dir='', random_crop=False)
  c.optim.base_lr = 4.5e-6
  c.train.update(batch_size=8, eval_batch_size=32, dtype='bfloat16')
  c.sample.update(top_k=250, top_p=1.0, temperature=1.0, num_samples=16)
  if args.get('smoke'):
    base.stage2_smoke(c)
    c.train.dtype = 'float32'
  return c
