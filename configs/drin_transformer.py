"""The paper's depth-conditional D-RIN transformer (`drin_transformer.yaml`; taming-spec e.2).

24 layers, 16 heads, 1024 wide, block 512: the 16x16 codes of a depth map under a second,
frozen depth VQGAN (1 channel, 1024 codes, `imagenetdepth_vqgan.yaml`) come first, then the
16x16 image codes of the ImageNet f16 VQGAN (1024 codes). Shared vocabulary as the original
(cond code k is token k; vocab 1024). Batch 2, lr = 2 x 4.5e-6 = 9e-6 as the original.

Data: a prepared TFDS dataset (config.data.name) with features `image` and `depth` (uint8 or
float in [0, 1] maps, cropped like the image); the depth VQGAN's stage-1 run is
config.cond.workdir. `:smoke` uses Fashion-MNIST's gray image as a stand-in depth map and a
random frozen cond VQGAN (plumbing only).
"""

from configs import common
from configs import common_transformer
from configs import imagenet_vqgan_f16_1024


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common_transformer.stage2_base()
  stage1 = imagenet_vqgan_f16_1024.get_config()
  c.stage1_config = common_transformer.stage1_model_fields(stage1)
  depth = common.stage1_base()
  depth.model.update(in_channels=1, out_ch=1, n_embed=1024, embed_dim=256)
  c.cond.update(kind='spatial', key='depth', one_hot=0, workdir='')
  c.cond.model = common_transformer.stage1_model_fields(depth)
  c.transformer.update(n_layer=24, n_head=16, n_embd=1024, block_size=512, shared_vocab=True)
  c.data = stage1.data
  c.data.update(name='drin', source='codes', codes_dir='', random_crop=False)
  c.optim.base_lr = 4.5e-6
  c.train.update(batch_size=2, eval_batch_size=16, dtype='bfloat16')
  c.sample.update(top_k=100, temperature=1.0, num_samples=8)
  if args.get('smoke'):
    common_transformer.apply_smoke(c)
    c.transformer.block_size = -1
    c.train.dtype = 'float32'
  return c
