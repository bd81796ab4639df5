"""The config schema: every field a run reads, with its default and why.

Experiment files (`configs/*.py` in the repository, or your own anywhere) start from
`stage1_base()` / `stage2_base()` and override what differs; they are plain Python files
passed by path (`--config=path.py[:arg]`), so the installed package never imports them.
A file that builds on another (a stage-2 config naming its stage-1 model) loads it with
`load_sibling(__file__, 'name')`, which works wherever the files live.

Stage 2's vocabulary (`transformer.shared_vocab`):
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

import importlib.util
import os

import ml_collections
from ml_collections import config_dict


def load_sibling(this_file, name):
  """The module `name`.py from the folder of `this_file` (a config file's `__file__`),
  imported by path: config files refer to each other without `sys.path` edits."""
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_vqgan_jax_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
    ('batch', ('data', 'fsdp')),  # activations' batch dim (input batches: data x fsdp)
    ('embed', 'fsdp'),  # GPT width
    ('mlp', 'tensor'),  # GPT MLP hidden
    ('heads', 'tensor'),  # GPT attention heads
    ('vocab', 'tensor'),  # GPT token embedding / head
    ('kv', None),  # GPT head_dim (KV cache)
    ('length', None),  # GPT sequence
    ('layers', None),  # GPT stacked layers (scan_layers)
    ('act_embed', None),  # GPT residual-stream activations' width
    ('conv_in', None),  # stage-1 kernels' input channels (fsdp picks a dim)
    ('conv_out', 'tensor'),  # stage-1 kernels' output channels
    ('codebook', None),  # stage-1 codebook entries
  )


def stage1_base():
  c = ml_collections.ConfigDict()
  c.stage = 'vqgan'
  c.seed = 0
  # The first-stage model (taming `ddconfig` + quantizer fields).
  c.model = ml_collections.ConfigDict(
    dict(
      ch=128,
      ch_mult=(1, 1, 2, 2, 4),
      num_res_blocks=2,
      attn_resolutions=(16,),
      dropout=0.0,
      in_channels=3,
      out_ch=3,
      resolution=256,
      z_channels=256,
      n_embed=1024,
      embed_dim=256,
      beta=0.25,
      legacy_beta=True,
      # 'vq': taming VQModel (VectorQuantizer2); 'gumbel': GumbelVQ (GumbelQuantize), whose
      # KL-to-uniform loss weight and Gumbel-softmax training temperature (constant here; the
      # original anneals it) are the next two fields. Not in the original: 'fsq' (finite
      # scalar quantization, fsq_levels) and 'lfq' (lookup-free, lfq_bits), whose every code
      # is reachable; n_embed must equal their code count, prod(fsq_levels) / 2**lfq_bits
      # (stage 2 sizes its vocabulary by n_embed), and embed_dim their number of channels.
      quantizer='vq',
      kl_weight=1e-8,
      temperature=1.0,
      # vq options beyond the original (the defaults are the original's quantizer):
      # > 0: codes are searched in this many dims, projected in and out (ViT-VQGAN/LlamaGen: 8).
      codebook_dim=0,
      # Nearest code by cosine: latents and codebook l2-normalised (LlamaGen).
      codebook_l2_norm=False,
      # > 0: the codebook is an EMA (this decay, e.g. 0.99) of the latents assigned to each
      # code, no codebook gradient; its statistics are train state (a 'quantizer' collection).
      ema_decay=0.0,
      # > 0: a code unpicked for this many steps is re-seeded from a latent of the batch.
      restart_window=0,
      fsq_levels=(),  # fsq: levels per channel, e.g. (8, 5, 5, 5) = 1000 codes
      lfq_bits=0,  # lfq: bits per code, 2**bits codes (beta is its commitment weight)
    )
  )
  c.loss = ml_collections.ConfigDict(
    dict(
      # Batches (not optimizer steps); a float in (0, 1) is a fraction of train.num_steps.
      disc_start=250001.0,
      codebook_weight=1.0,
      perceptual_weight=1.0,
      disc_factor=1.0,
      disc_weight=0.8,
      disc_loss='hinge',
      disc_num_layers=3,
      disc_ndf=64,
      # The original trains with LPIPS dropout on (Lightning's train() undoes its eval()).
      lpips_dropout=True,
      # False: the generator's GAN weight is disc_weight itself (MAGVIT 0.1, LlamaGen 0.5)
      # instead of the original's adaptive lambda (which swings when D switches on).
      adaptive_weight=True,
      # LeCAM regulariser of D (MAGVIT, Open-MAGVIT2: 0.05), against EMAs (this decay) of
      # D's mean logits on reals and fakes; 0: off.
      lecam_weight=0.0,
      lecam_decay=0.999,
      # R1 gradient penalty on reals, r1_weight / 2 * E||grad_x D(x)||^2 (MaskGIT: 10); 0: off.
      r1_weight=0.0,
      # lfq: weight of the entropy term (per-latent entropy - batch entropy), at temperature
      # entropy_temperature; it starts at entropy_anneal_factor x the weight and decays
      # linearly to it over entropy_anneal_steps (0: constant).
      entropy_weight=0.1,
      entropy_temperature=0.01,
      entropy_anneal_steps=0,
      entropy_anneal_factor=3.0,
    )
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      base_lr=4.5e-6,
      scale_lr=True,  # lr = base_lr * global batch, as taming's main.py
      b1=0.5,
      b2=0.9,
      eps=1e-8,
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      name='imagenet2012',  # any prepared TFDS image dataset, 'fashion_mnist' or 'folder'
      data_dir='',  # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
      folder='',  # source images when name == 'folder'
      validation_fraction=0.05,  # held out of a folder dataset as its 'validation' split
      source_dir='/usr/share/datasets/fashion-mnist',  # IDX files for fashion_mnist
      image_key='image',
      image_size=256,
      train_split='train',
      eval_split='validation',
      random_crop=True,
      worker_count=0,
      # Each split decoded once into memory (Fashion-MNIST: straight from its IDX files):
      # no per-record read and decode. For datasets that fit in host memory.
      in_memory=False,
      read_threads=16,  # grain's reading threads per process; 0: read in the loading thread
      eval_examples=-1,  # -1: the whole eval split
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      batch_size=12,  # global
      eval_batch_size=16,  # global
      num_steps=1_000_000,
      log_every=100,
      eval_every=5000,
      checkpoint_every=5000,
      max_to_keep=3,
      dtype='float32',  # compute dtype: bfloat16 on accelerators; 'auto': kernels/dtype_choice.py
      # Rematerialisation of the VQGAN: 'none', or 'block': each ResnetBlock and AttnBlock
      # under nn.remat with the jax.checkpoint_policies policy `remat_policy`. Parameter names
      # and values are unchanged, so (like dtype) it may differ between resumes; it lives
      # here, not in `model` (the checkpoint's identity).
      remat='none',
      remat_policy='nothing_saveable',
      # Which kernels compute the convs on CPU (vqgan_jax/kernels/cpu_conv.py): 'auto' (the
      # Winograd / patch-matmul kernels where they measured faster, on a one-device process),
      # 'cpu' (those kernels, looping over batch chunks, on any device count: one-device
      # meshes only), 'xla' (XLA's own), 'tuned' (per conv shape, the fastest of those as timed
      # once on this machine, cached on disk: kernels/tune.py). Accelerators use XLA's under
      # every choice. Like dtype, it may differ between resumes.
      conv_impl='auto',
      num_grid_images=16,
      # > 0: keep an EMA (this decay, e.g. 0.999) of the generator's params in the state
      # ('params_ema'); eval, --mode=encode and the loaders then use it. 0: off.
      params_ema_decay=0.0,
      # Codebook health: the fraction of codes picked in the last usage_window steps is
      # logged (window_usage) every log step; one warning line when it falls below
      # usage_warning once a whole window has run. 0: off.
      usage_window=100,
      usage_warning=0.25,
    )
  )
  # Mesh axis sizes; -1 takes the remaining devices. The batch splits over data x fsdp;
  # params/opt-state by logical_axis_rules (ZeRO-3 over fsdp; conv outputs over tensor).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = logical_axis_rules()
  c.init_from = ''
  c.eval = eval_fields()
  return c


def eval_fields():
  """`--mode=eval` (both stages) and the held-out measures of the field; see
  `vqgan_jax/evaluate.py`."""
  return ml_collections.ConfigDict(
    dict(
      # Stage 1: reconstruct the images of this folder (any nesting; jpg/png/...) instead of
      # data.eval_split; they are resized and centre-cropped to data.image_size.
      folder='',
      split='',  # '' -> data.eval_split
      # The first N images of the split: stage 1 evaluates them, stage 2 takes its reference
      # statistics from them; -1: all.
      num_examples=-1,
      batch_size=-1,  # global; -1 -> train.eval_batch_size
      step=-1,  # the checkpoint to evaluate; -1: the latest
      # pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or its converted .npz) for
      # rFID / gFID / IS; '' -> $VQGAN_JAX_INCEPTION; neither: those are skipped, said once.
      inception_weights='',
      # A classifier workdir (configs/fashion_mnist_classifier.py): the Frechet distance in
      # its feature space (`fd_<its feature_name>`, never called FID) and, for class-
      # conditional samples, the share the classifier labels as the class they were drawn for.
      classifier_workdir='',
      stats_dir='',  # reference statistics cache; '' -> <workdir>/eval_stats
      num_samples=1000,  # stage 2: samples drawn (class-balanced for class models)
      seed=0,  # stage 2: the samples depend only on this seed (and the checkpoint)
    )
  )


def classifier_base():
  """A small image classifier whose penultimate features give an offline Frechet distance
  (see `eval_fields`); trained like any run (`python -m vqgan_jax.main`)."""
  c = ml_collections.ConfigDict()
  c.stage = 'classifier'
  c.seed = 0
  c.model = ml_collections.ConfigDict(
    dict(
      patch=4,  # the stem's patch size (and stride)
      features=(64, 64, 64),  # the stem's width, then one 3x3 conv per further entry
      hidden=128,  # the penultimate width: the feature space of the Frechet distance
      num_classes=10,
      # The metric's name: fd_<feature_name> (e.g. fd_fmnist). Only features of the data the
      # classifier was trained on mean anything.
      feature_name='',
    )
  )
  c.optim = ml_collections.ConfigDict(dict(lr=2e-3, weight_decay=1e-4, warmup_steps=100))
  c.data = stage1_base().data
  c.train = ml_collections.ConfigDict(
    dict(
      batch_size=128,
      eval_batch_size=500,
      num_steps=1000,
      log_every=100,
      eval_every=1000,
      checkpoint_every=500,
      max_to_keep=1,
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = logical_axis_rules()
  return c


def fashion_mnist_data(**overrides):
  """`config.data` fields of the Fashion-MNIST demos: 32x32 (the 28x28 images enlarged), the
  test split held out, in memory and read without grain's threads (loading cost 1.0 ms of a
  2-core host's time per image from TFDS with grain's threads, 0.58 ms without them, 0.21 ms
  from memory)."""
  return dict(
    name='fashion_mnist',
    image_size=32,
    train_split='train',
    eval_split='test',
    random_crop=False,
    in_memory=True,
    read_threads=0,
    **overrides,
  )


def stage1_smoke(c):
  """Shrinks a stage-1 config to a tiny model and a few steps on Fashion-MNIST (offline),
  keeping every part of the pipeline: data, both updates, eval, checkpoints, images."""
  c.model.update(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    resolution=32,
    z_channels=32,
    n_embed=64,
    embed_dim=16,
  )
  c.loss.update(disc_start=4.0, disc_ndf=16, disc_num_layers=2)
  c.data.update(fashion_mnist_data(eval_examples=64))
  c.train.update(
    batch_size=8,
    eval_batch_size=32,
    num_steps=8,
    log_every=2,
    eval_every=8,
    checkpoint_every=4,
    num_grid_images=8,
  )
  return c


def stage1_model_fields(stage1_config=None):
  """The stage-1 `model` fields. Values are checked against (and missing ones filled from) the
  stage-1 checkpoint's saved config at run time; `None` means "take it from the checkpoint"."""
  if stage1_config is None:
    stage1_config = stage1_base()
  return ml_collections.ConfigDict(stage1_config.model.to_dict())


def stage2_base():
  c = ml_collections.ConfigDict()
  c.stage = 'transformer'
  c.seed = 0
  # The frozen first stage: a stage-1 workdir (its latest checkpoint's params and config).
  c.stage1_workdir = ''
  c.stage1_config = stage1_model_fields()
  c.cond = ml_collections.ConfigDict(
    dict(
      kind='unconditional',  # 'unconditional' (SOS token) | 'class' | 'spatial'
      n_classes=0,  # class: number of classes (Labelator)
      sos_token=0,  # shared_vocab only: the SOS id (taming's sos_token); offset: n_embed
      drop_prob=0.0,  # class: replace the class by a null token with this probability
      # (classifier-free guidance; offset convention only; not original)
      # spatial: a second frozen VQGAN encodes the dataset feature `key` (depth, segmentation)
      key='',
      one_hot=0,  # > 0: `key` is an integer label map, one-hot with this many channels
      labels_from_intensity=False,  # smoke only: a fake label map from a gray image's intensity
      workdir='',  # the cond VQGAN's stage-1 workdir
      random_init=False,  # smoke/tests only: a randomly initialised frozen cond VQGAN
      model=stage1_model_fields(),
    )
  )
  c.transformer = ml_collections.ConfigDict(
    dict(
      # 'gpt': taming's autoregressive GPT (one code per sampling step); 'maskgit': a
      # bidirectional transformer trained on masked codes, sampled in config.sample.iterations
      # parallel steps (its vocabulary adds a [MASK] id last; block = cond + image length).
      kind='gpt',
      vocab_size=-1,  # -1: from the vocabulary convention (see the module docstring)
      block_size=-1,  # -1: cond length + image length - 1 (maskgit: cond + image length)
      n_layer=12,
      n_head=8,
      n_embd=256,
      embd_pdrop=0.0,
      resid_pdrop=0.0,
      attn_pdrop=0.0,
      pkeep=1.0,  # gpt: keep each input image token with this probability, else random
      label_smoothing=0.0,  # maskgit: of its masked-code loss (MaskGIT: 0.1); gpt: must be 0
      shared_vocab=False,
      # Train under nn.scan over stacked layer params (the checkpointed layout too); the sampler
      # unstacks them into the per-layer layout it needs. On CPU False trains faster (the demo
      # configs set it; experiments/bench_stage2.py times both).
      scan_layers=True,
      # Rematerialisation per block: 'none' | 'block' (nn.remat with remat_policy, a
      # jax.checkpoint_policies name); 'full' = block with nothing_saveable; a policy name
      # alone = block with that policy. ('' = 'none'.)
      remat='none',
      remat_policy='nothing_saveable',
    )
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      base_lr=4.5e-6,
      scale_lr=True,  # lr = base_lr * global batch, as taming's main.py
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.01,  # on Dense kernels only (biases, LayerNorm, embeddings, pos_emb: none)
      warmup_steps=0,  # linear warm-up from 0 (the original has none)
      schedule='constant',  # 'constant' | 'cosine' (to final_lr_fraction * lr at num_steps)
      final_lr_fraction=0.0,
      grad_clip=0.0,  # global-norm clipping; 0: none (the original has none)
    )
  )
  c.data = stage1_base().data
  c.data.update(
    source='codes',  # 'codes': the dataset --mode=encode wrote; 'images': encode in the step
    codes_dir='',  # '' -> <workdir>/codes
    # > 0: train on crop_codes x crop_codes windows of each image's code grid (random per
    # example and epoch; centred in eval), as the original crops its high-resolution images;
    # samples of the whole grid then come from the sliding window. 0: the whole grid.
    crop_codes=0,
  )
  c.encode = ml_collections.ConfigDict(
    dict(
      batch_size=64,  # global
      max_examples=-1,  # per split; -1: all
      overwrite=False,
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      batch_size=16,
      eval_batch_size=16,  # global
      num_steps=1_000_000,
      log_every=100,
      eval_every=5000,
      checkpoint_every=5000,
      max_to_keep=3,
      dtype='float32',  # compute dtype: bfloat16 on accelerators; 'auto': kernels/dtype_choice.py
    )
  )
  c.sample = ml_collections.ConfigDict(
    dict(
      temperature=1.0,
      top_k=100,
      top_p=1.0,
      cfg_scale=1.0,  # != 1: classifier-free guidance (needs cond.drop_prob > 0)
      classes=config_dict.placeholder(tuple),  # class models: which classes (None: all)
      num_per_class=8,  # class models: samples per class (one grid row per class)
      num_samples=16,  # unconditional / spatial models
      batch_size=32,
      grid_h=0,
      # 0: the whole image's code grid (MaskGIT: its training grid); larger than the training
      # grid (or data.crop_codes): the sliding-window sampler (gpt only).
      grid_w=0,
      seed=0,
      # maskgit: parallel decoding iterations T, the masking schedule ('cosine' | 'linear' |
      # 'square'), the scale of the Gumbel noise on the confidence (annealed to 0) and the
      # confidence: 'sampled' (MaskGIT's: log p of the drawn code) | 'max' (the position's
      # largest log p, blind to the draw: maskgit_sampling.CONFIDENCES says why);
      # final_temperature: the draws' temperature at the last iteration, linear from
      # `temperature` at the first (< 0: `temperature` throughout).
      iterations=8,
      schedule='cosine',
      choice_temperature=4.5,
      confidence='sampled',
      final_temperature=-1.0,
      # Completion instead of sampling (completion.py): an image folder or a split of
      # config.data ('' : sample); the first complete_examples images, the codes `keep`
      # names kept (top_half | left_half | center_box | outside_center_box; a GPT needs
      # top_half), completions_per_image completions of each.
      complete_folder='',
      keep='top_half',
      complete_examples=8,
      completions_per_image=4,
    )
  )
  # Mesh axis sizes; -1 takes the remaining devices. The batch splits over data x fsdp;
  # parameters by their logical axes (embed -> fsdp; heads, mlp, vocab -> tensor).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = logical_axis_rules()
  c.init_from = ''  # a stage-2 workdir whose latest params start this run
  c.eval = eval_fields()
  return c


def smoke_stage1():
  """The stage-1 smoke model (what `configs/fashion_mnist_vqgan.py:smoke` trains)."""
  return stage1_smoke(stage1_base())


def stage2_smoke(c):
  """A tiny GPT over the stage-1 smoke VQGAN's codes, a few steps on Fashion-MNIST (offline)."""
  c.stage1_workdir = 'workdirs/fashion_mnist_vqgan_smoke'
  c.stage1_config = stage1_model_fields(smoke_stage1())
  c.transformer.update(n_layer=2, n_head=2, n_embd=64, vocab_size=-1, block_size=-1)
  c.data.update(fashion_mnist_data(eval_examples=-1))
  c.encode.update(batch_size=64, max_examples=256)
  c.optim.update(base_lr=1e-5, warmup_steps=2, schedule='cosine')
  c.train.update(
    batch_size=16, eval_batch_size=32, num_steps=8, log_every=2, eval_every=8, checkpoint_every=4
  )
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
