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

from vqgan_jax import config_base as base

common_transformer = base.load_sibling(__file__, 'common_transformer')


def get_config(arg=None):
  return common_transformer.spatial_transformer(
    base.parse_arg(arg), key='depth', one_hot=0, cond_channels=1, data_name='drin', batch_size=2
  )
