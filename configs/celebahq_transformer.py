"""The paper's unconditional CelebA-HQ transformer (taming-spec e.2; README FID 10.2).

The same model, data format and training settings as `ffhq_transformer.py` (24 layers, 16
heads, 1664 wide, SOS + 16x16 codes of the FacesHQ f16 VQGAN with 1024 codes); only the
folder of 256x256 faces differs (--config.data.folder=DIR).
"""

from vqgan_jax import config_base as base

ffhq_transformer = base.load_sibling(__file__, 'ffhq_transformer')


def get_config(arg=None):
  return ffhq_transformer.get_config(arg)
