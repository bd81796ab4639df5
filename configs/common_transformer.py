"""Fields every stage-2 (transformer) config shares; each experiment file overrides what differs.

A stage-2 run trains taming's Net2NetTransformer: a GPT over the code sequence
`[condition tokens | image codes]` of a frozen stage-1 VQGAN, loss on the image codes only.

Vocabulary (`transformer.shared_vocab`):
  False (default for new models), the *offset* convention: image codes keep ids [0, n_embed);
    condition tokens come after them: SOS = n_embed (unconditional), class c = n_embed + c,
    cond-VQGAN code k = n_embed + k. vocab = n_embed + 1 (unconditional),
    n_embed + n_classes (+1 null class when cond.drop_prob > 0, for classifier-free guidance),
    or n_embed + the cond VQGAN's n_embed (spatial).
  True, the original's convention (needed to load converted taming checkpoints): condition
    tokens share the image codes' table with no offset (SOS = cond.sos_token, class c = c,
    cond code k = k); vocab = max(n_embed, n_classes / cond n_embed).
In both, the loss and the sampler only consider the first n_embed logits (image codes).
"""

import ml_collections
from ml_collections import config_dict

from configs import common
from configs import imagenet_vqgan_f16_1024


def stage1_model_fields(stage1_config=None):
  """The stage-1 `model` fields. Values are checked against (and missing ones filled from) the
  stage-1 checkpoint's saved config at run time; `None` means "take it from the checkpoint"."""
  if stage1_config is None:
    stage1_config = common.stage1_base()
  return ml_collections.ConfigDict(stage1_config.model.to_dict())


def stage2_base():
  c = ml_collections.ConfigDict()
  c.stage = 'transformer'
  c.seed = 0
  # The frozen first stage: a stage-1 workdir (its latest checkpoint's params and config).
  c.stage1_workdir = ''
  c.stage1_config = stage1_model_fields()
  c.cond = ml_collections.ConfigDict(dict(
      kind='unconditional',  # 'unconditional' (SOS token) | 'class' | 'spatial'
      n_classes=0,           # class: number of classes (Labelator)
      sos_token=0,           # shared_vocab only: the SOS id (taming's sos_token); offset: n_embed
      drop_prob=0.0,         # class: replace the class by a null token with this probability
                             # (classifier-free guidance; offset convention only; not original)
      # spatial: a second frozen VQGAN encodes the dataset feature `key` (depth, segmentation)
      key='',
      one_hot=0,             # > 0: `key` is an integer label map, one-hot with this many channels
      labels_from_intensity=False,  # smoke only: a fake label map from a gray image's intensity
      workdir='',            # the cond VQGAN's stage-1 workdir
      random_init=False,     # smoke/tests only: a randomly initialised frozen cond VQGAN
      model=stage1_model_fields(),
  ))
  c.transformer = ml_collections.ConfigDict(dict(
      vocab_size=-1,         # -1: from the vocabulary convention (see the module docstring)
      block_size=-1,         # -1: cond length + image length - 1
      n_layer=12, n_head=8, n_embd=256,
      embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0,
      pkeep=1.0,             # keep each input image token with this probability, else random
      shared_vocab=False,
      # Train under nn.scan over stacked layer params (the checkpointed layout too); the sampler
      # unstacks them into the per-layer layout it needs.
      scan_layers=True,
      # Rematerialisation per block: 'none' | 'block' (nn.remat with remat_policy, a
      # jax.checkpoint_policies name); 'full' = block with nothing_saveable; a policy name
      # alone = block with that policy. ('' = 'none'.)
      remat='none',
      remat_policy='nothing_saveable',
  ))
  c.optim = ml_collections.ConfigDict(dict(
      base_lr=4.5e-6,
      scale_lr=True,         # lr = base_lr * global batch, as taming's main.py
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.01,     # on Dense kernels only (biases, LayerNorm, embeddings, pos_emb: none)
      warmup_steps=0,        # linear warm-up from 0 (the original has none)
      schedule='constant',   # 'constant' | 'cosine' (to final_lr_fraction * lr at num_steps)
      final_lr_fraction=0.0,
      grad_clip=0.0,         # global-norm clipping; 0: none (the original has none)
  ))
  c.data = common.stage1_base().data
  c.data.update(
      source='codes',        # 'codes': the dataset --mode=encode wrote; 'images': encode in the step
      codes_dir='',          # '' -> <workdir>/codes
  )
  c.encode = ml_collections.ConfigDict(dict(
      batch_size=64,         # global
      max_examples=-1,       # per split; -1: all
      overwrite=False,
  ))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=16, eval_batch_size=16,  # global
      num_steps=1_000_000,
      log_every=100, eval_every=5000, checkpoint_every=5000, max_to_keep=3,
      dtype='float32',       # compute dtype; bfloat16 on accelerators
  ))
  c.sample = ml_collections.ConfigDict(dict(
      temperature=1.0, top_k=100, top_p=1.0,
      cfg_scale=1.0,         # != 1: classifier-free guidance (needs cond.drop_prob > 0)
      classes=config_dict.placeholder(tuple),  # class models: which classes (None: all)
      num_per_class=8,       # class models: samples per class (one grid row per class)
      num_samples=16,        # unconditional / spatial models
      batch_size=32,
      grid_h=0, grid_w=0,    # 0: the training grid; larger: the sliding-window sampler
      seed=0,
  ))
  # Mesh axis sizes; -1 takes the remaining devices. The batch splits over data x fsdp;
  # parameters by their logical axes (embed -> fsdp; heads, mlp, vocab -> tensor).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = common.logical_axis_rules()
  c.init_from = ''           # a stage-2 workdir whose latest params start this run
  return c


def smoke_stage1():
  """The stage-1 smoke model (what `configs/fashion_mnist_vqgan.py:smoke` trains)."""
  return common.apply_smoke(common.stage1_base())


def spatial_transformer(args, *, key, one_hot, cond_channels, data_name, batch_size,
                        smoke_one_hot=0):
  """The paper's spatially conditioned transformers (D-RIN, S-FLCKR): 24 layers, 16 heads,
  1024 wide, block 512 = the 16x16 codes of the dataset feature `key` under a second, frozen
  VQGAN (`cond_channels` input channels, 1024 codes), then the 16x16 image codes of the
  ImageNet f16 VQGAN with 1024 codes; the original's shared vocabulary (vocab 1024).
  lr = 4.5e-6 x global batch. `smoke_one_hot`: the label count of `:smoke`'s fake map."""
  c = stage2_base()
  stage1 = imagenet_vqgan_f16_1024.get_config()
  c.stage1_config = stage1_model_fields(stage1)
  cond = common.stage1_base()
  cond.model.update(in_channels=cond_channels, out_ch=cond_channels, n_embed=1024,
                    embed_dim=256)
  c.cond.update(kind='spatial', key=key, one_hot=one_hot, workdir='')
  c.cond.model = stage1_model_fields(cond)
  c.transformer.update(n_layer=24, n_head=16, n_embd=1024, block_size=512, shared_vocab=True)
  c.data = stage1.data
  c.data.update(name=data_name, source='codes', codes_dir='', random_crop=False)
  c.optim.base_lr = 4.5e-6
  c.train.update(batch_size=batch_size, eval_batch_size=16, dtype='bfloat16')
  c.sample.update(top_k=100, temperature=1.0, num_samples=8)
  if args.get('smoke'):
    c.cond.one_hot = smoke_one_hot
    apply_smoke(c)
    c.transformer.block_size = -1
    c.train.dtype = 'float32'
  return c


def apply_smoke(c):
  """A tiny GPT over the stage-1 smoke VQGAN's codes, a few steps on Fashion-MNIST (offline)."""
  c.stage1_workdir = 'workdirs/fashion_mnist_vqgan_smoke'
  c.stage1_config = stage1_model_fields(smoke_stage1())
  c.transformer.update(n_layer=2, n_head=2, n_embd=64, vocab_size=-1, block_size=-1)
  c.data.update(name='fashion_mnist', image_size=32, train_split='train', eval_split='test',
                random_crop=False, eval_examples=-1)
  c.encode.update(batch_size=64, max_examples=256)
  c.optim.update(base_lr=1e-5, warmup_steps=2, schedule='cosine')
  c.train.update(batch_size=16, eval_batch_size=32, num_steps=8, log_every=2, eval_every=8,
                 checkpoint_every=4)
  c.sample.update(num_per_class=2, num_samples=4, batch_size=32, top_k=16)
  if c.cond.kind == 'class':
    c.cond.n_classes = 10
  if c.cond.kind == 'spatial':
    # A random frozen cond VQGAN over a map derived from the image itself (plumbing only).
    c.cond.update(key='image', workdir='', random_init=True)
    c.cond.model = stage1_model_fields(smoke_stage1())
    c.cond.model.update(in_channels=c.cond.one_hot or 1, out_ch=c.cond.one_hot or 1)
    c.cond.labels_from_intensity = bool(c.cond.one_hot)
  return c
