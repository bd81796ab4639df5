"""The paper's segmentation-conditional S-FLCKR transformer (released sflckr project.yaml;
taming-spec e.2).

24 layers, 16 heads, 1024 wide, block 512: the 16x16 codes of a segmentation map under a
second, frozen VQGAN over 182 one-hot channels (`sflckr_cond_stage.yaml`: 1024 codes) come
first, then the 16x16 image codes of an f16 VQGAN with 1024 codes. Shared vocabulary as the
original (vocab 1024). Batch size not published; lr = 4.5e-6 x global batch. Larger images
(e.g. 672x1024) are sampled by the sliding window in taming's scripts.

Data: a prepared TFDS dataset with features `image` and `segmentation` (integer labels in
[0, 182)); the segmentation VQGAN's run is config.cond.workdir. `:smoke` fakes a 4-label map
from Fashion-MNIST's intensities and uses a random frozen cond VQGAN (plumbing only).
"""

from configs import common
from configs import common_transformer
from configs import imagenet_vqgan_f16_1024


def get_config(arg=None):
  args = common.parse_arg(arg)
  c = common_transformer.stage2_base()
  stage1 = imagenet_vqgan_f16_1024.get_config()
  c.stage1_config = common_transformer.stage1_model_fields(stage1)
  seg = common.stage1_base()
  seg.model.update(in_channels=182, out_ch=182, n_embed=1024, embed_dim=256)
  c.cond.update(kind='spatial', key='segmentation', one_hot=182, workdir='')
  c.cond.model = common_transformer.stage1_model_fields(seg)
  c.transformer.update(n_layer=24, n_head=16, n_embd=1024, block_size=512, shared_vocab=True)
  c.data = stage1.data
  c.data.update(name='sflckr', source='codes', codes_dir='', random_crop=False)
  c.optim.base_lr = 4.5e-6
  c.train.update(batch_size=4, eval_batch_size=16, dtype='bfloat16')
  c.sample.update(top_k=100, temperature=1.0, num_samples=8)
  if args.get('smoke'):
    c.cond.one_hot = 4
    common_transformer.apply_smoke(c)
    c.transformer.block_size = -1
    c.train.dtype = 'float32'
  return c
