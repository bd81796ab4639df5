"""Fields every stage-1 config shares; each experiment file overrides what differs."""

import ml_collections


def parse_arg(arg):
  """Parses a config-file argument like ``smoke`` or ``smoke,res=64``."""
  out = {}
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    out[key.strip()] = value.strip() if value else True
  return out


def logical_axis_rules():
  """The one table of logical-axis rules (logical axis -> mesh axis, tuple of mesh axes, or
  None), for both stages; `vqgan_jax/parallel.py` explains how it is applied.

  Stage 2's GPT annotates its params and activations with these names (maxtext-style):
  `embed -> fsdp` is its ZeRO-3 sharding, heads/mlp/vocab -> tensor its Megatron split.
  Stage 1 (VQGAN, discriminator; the frozen VQGANs of stage 2) gets its conv/Dense kernels'
  names from their layout: conv_out -> tensor splits output channels when mesh.tensor > 1;
  an array no rule put on fsdp goes there along its largest divisible dimension.
  """
  return (
      ('batch', ('data', 'fsdp')),   # activations' batch dim (input batches: data x fsdp)
      ('embed', 'fsdp'),             # GPT width
      ('mlp', 'tensor'),             # GPT MLP hidden
      ('heads', 'tensor'),           # GPT attention heads
      ('vocab', 'tensor'),           # GPT token embedding / head
      ('kv', None),                  # GPT head_dim (KV cache)
      ('length', None),              # GPT sequence
      ('layers', None),              # GPT stacked layers (scan_layers)
      ('act_embed', None),           # GPT residual-stream activations' width
      ('conv_in', None),             # stage-1 kernels' input channels (fsdp picks a dim)
      ('conv_out', 'tensor'),        # stage-1 kernels' output channels
      ('codebook', None),            # stage-1 codebook entries
  )


def stage1_base():
  c = ml_collections.ConfigDict()
  c.stage = 'vqgan'
  c.seed = 0
  # The first-stage model (taming `ddconfig` + quantizer fields).
  c.model = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
      dropout=0.0, in_channels=3, out_ch=3, resolution=256, z_channels=256,
      n_embed=1024, embed_dim=256, beta=0.25, legacy_beta=True,
      # 'vq': taming VQModel (VectorQuantizer2); 'gumbel': GumbelVQ (GumbelQuantize), whose
      # KL-to-uniform loss weight and Gumbel-softmax training temperature (constant here; the
      # original anneals it) are the next two fields.
      quantizer='vq', kl_weight=1e-8, temperature=1.0,
  ))
  c.loss = ml_collections.ConfigDict(dict(
      # Batches (not optimizer steps); a float in (0, 1) is a fraction of train.num_steps.
      disc_start=250001.0,
      codebook_weight=1.0, perceptual_weight=1.0,
      disc_factor=1.0, disc_weight=0.8, disc_loss='hinge',
      disc_num_layers=3, disc_ndf=64,
      # The original trains with LPIPS dropout on (Lightning's train() undoes its eval()).
      lpips_dropout=True,
  ))
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=4.5e-6,
      scale_lr=True,  # lr = base_lr * global batch, as taming's main.py
      b1=0.5, b2=0.9, eps=1e-8,
  ))
  c.data = ml_collections.ConfigDict(dict(
      name='imagenet2012',   # any prepared TFDS image dataset, 'fashion_mnist' or 'folder'
      data_dir='',           # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
      folder='',             # source images when name == 'folder'
      validation_fraction=0.05,  # held out of a folder dataset as its 'validation' split
      source_dir='/usr/share/datasets/fashion-mnist',  # IDX files for fashion_mnist
      image_key='image',
      image_size=256,
      train_split='train', eval_split='validation',
      random_crop=True,
      worker_count=0,
      eval_examples=-1,      # -1: the whole eval split
  ))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=12,          # global
      eval_batch_size=16,     # global
      num_steps=1_000_000,
      log_every=100,
      eval_every=5000,
      checkpoint_every=5000,
      max_to_keep=3,
      dtype='float32',        # compute dtype; bfloat16 on accelerators
      # Rematerialisation of the VQGAN: 'none', or 'block': each ResnetBlock and AttnBlock
      # under nn.remat with the jax.checkpoint_policies policy `remat_policy`. Parameter names
      # and values are unchanged, so (like dtype) it may differ between resumes; it lives
      # here, not in `model` (the checkpoint's identity).
      remat='none',
      remat_policy='nothing_saveable',
      num_grid_images=16,
  ))
  # Mesh axis sizes; -1 takes the remaining devices. The batch splits over data x fsdp;
  # params/opt-state by logical_axis_rules (ZeRO-3 over fsdp; conv outputs over tensor).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = logical_axis_rules()
  c.init_from = ''
  return c


def apply_smoke(c):
  """Shrinks a stage-1 config to a tiny model and a few steps on Fashion-MNIST (offline),
  keeping every part of the pipeline: data, both updates, eval, checkpoints, images."""
  c.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                 resolution=32, z_channels=32, n_embed=64, embed_dim=16)
  c.loss.update(disc_start=4.0, disc_ndf=16, disc_num_layers=2)
  c.data.update(name='fashion_mnist', image_size=32, eval_split='test', random_crop=False,
                eval_examples=64)
  c.train.update(batch_size=8, eval_batch_size=32, num_steps=8, log_every=2, eval_every=8,
                 checkpoint_every=4, num_grid_images=8)
  return c
