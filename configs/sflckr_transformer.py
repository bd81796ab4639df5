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

from vqgan_jax import config_base as base

common_transformer = base.load_sibling(__file__, 'common_transformer')


def get_config(arg=None):
  return common_transformer.spatial_transformer(
    base.parse_arg(arg),
    key='segmentation',
    one_hot=182,
    cond_channels=182,
    data_name='sflckr',
    batch_size=4,
    smoke_one_hot=4,
  )
