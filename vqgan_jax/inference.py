"""Trained models from their workdirs, ready to use from Python.

    import vqgan_jax
    vq = vqgan_jax.load_vqgan('workdirs/fashion_mnist_vqgan')
    codes = vq.encode(images_uint8)              # (N, h, w) int32
    recon = vq.decode(codes)                     # (N, H, W, C) float32, ~[-1, 1]
    gpt = vqgan_jax.load_transformer('workdirs/fm_gpt')
    codes, images = gpt.sample(gpt.condition_for_class([7] * 8), jax.random.key(0), top_k=100)
    mg = vqgan_jax.load_transformer('workdirs/fm_maskgit')  # transformer.kind='maskgit'
    codes, images = mg.sample(mg.condition_for_class([7] * 8), iterations=8, schedule='cosine')

Both read the config saved with the checkpoint (no config file needed), restore the
parameters straight into their shardings on a mesh (all devices on its batch axis by default,
any process count: every process calls with the same arguments), and accept the workdirs that
`python -m vqgan_jax.convert` writes from the original release. The methods take and return
host numpy arrays; `.model` and `.params` are there for your own jitted functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqgan_jax import checkpoints
from vqgan_jax import checks
from vqgan_jax import completion
from vqgan_jax import encode as codes_lib
from vqgan_jax import maskgit_sampling
from vqgan_jax import parallel
from vqgan_jax import run_config
from vqgan_jax import sampling
from vqgan_jax.models import gpt_load
from vqgan_jax.models import vqgan as vqgan_lib
from vqgan_jax.models import vqgan_load


def _saved_config(workdir, step):
  """(the config saved with `step`, or with the newest readable step; the step asked for, or
  the newest on disk)."""
  with checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None) as ckpt:
    latest = ckpt.latest_step()
    if latest is None:
      raise checkpoints.CheckpointError(f'No checkpoint in {ckpt.directory}: train first.')
    return ml_collections.ConfigDict(ckpt.restore_config(step)), latest if step is None else step


def _final_temperature(sample_config):
  """config.sample.final_temperature as the sampler takes it: None (< 0: the temperature
  throughout) or the draws' temperature at MaskGIT's last iteration."""
  value = float(sample_config.get('final_temperature', -1.0))
  return None if value < 0 else value


def _default_mesh():
  return parallel.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})


def _rules(config):
  return parallel.axis_rules(config) if config.get('logical_axis_rules') else parallel.DEFAULT_RULES


def _to_global(x: np.ndarray, sharding):
  """A host array that every process holds whole -> a global array with `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _chunks(n: int, batch_size: int, divisor: int):
  """(start, stop, padded size) of each chunk of a batch of `n`, padded to the mesh."""
  size = max(divisor, batch_size // divisor * divisor)
  for start in range(0, n, size):
    stop = min(n, start + size)
    yield start, stop, -(-(stop - start) // divisor) * divisor


@dataclasses.dataclass
class TrainedVQGAN:
  """A stage-1 VQGAN with its parameters on a mesh: encode, decode, reconstruct."""

  model: vqgan_lib.VQGAN
  params: Any
  config: ml_collections.ConfigDict  # the config saved with the checkpoint
  step: int
  mesh: jax.sharding.Mesh
  batch_size: int = 256  # images per compiled call (rounded to the mesh)

  def __post_init__(self):
    batch = parallel.batch_sharding(self.mesh)
    p_sh = jax.tree.map(lambda x: x.sharding, self.params)
    model = self.model

    def encode(params, x):
      return model.apply({'params': params}, _model_range(x), method='encode_to_indices')

    def decode(params, idx):
      return model.apply({'params': params}, idx, method='decode_indices').astype(jnp.float32)

    self._encode = jax.jit(encode, in_shardings=(p_sh, batch), out_shardings=batch)
    self._decode = jax.jit(decode, in_shardings=(p_sh, batch), out_shardings=batch)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.model.ch_mult) - 1)

  def _images(self, images) -> np.ndarray:
    return checks.images(images, channels=self.model.in_channels, factor=self.downsample_factor)

  def _map(self, fn, x: np.ndarray) -> np.ndarray:
    """`fn(params, chunk)` over chunks of x, padded to the mesh's batch axes."""
    divisor = parallel.batch_divisor(self.mesh)
    batch = parallel.batch_sharding(self.mesh)
    out = []
    for start, stop, padded in _chunks(len(x), self.batch_size, divisor):
      chunk = x[start:stop]
      if padded > len(chunk):
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], padded - len(chunk), axis=0)])
      out.append(parallel.gather(fn(self.params, _to_global(chunk, batch)))[: stop - start])
    return np.concatenate(out)

  def encode(self, images) -> np.ndarray:
    """(N, H, W, C) images (uint8 in [0, 255], or float in [-1, 1]; gray (N, H, W) or
    (N, H, W, 1) for an RGB model is repeated to RGB) -> (N, H/f, W/f) int32 code indices."""
    return self._map(self._encode, self._images(images))

  def decode(self, indices) -> np.ndarray:
    """(N, h, w) code indices -> (N, H, W, C) float32 images, nominally [-1, 1] (unclipped,
    the decoder's output)."""
    shape = np.shape(indices)
    if len(shape) != 3:
      raise ValueError(f'indices must be (N, h, w) code grids, got shape {shape}')
    checks.nonempty_batch(shape, 'indices')
    idx = checks.integers(indices, 'indices', 0, self.model.n_embed, what='code indices')
    return self._map(self._decode, idx)

  def reconstruct(self, images) -> np.ndarray:
    """encode then decode: (N, H, W, C) float32 reconstructions, nominally [-1, 1]."""
    return self.decode(self.encode(images))


def _model_range(x):
  if jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.float32) / 127.5 - 1.0
  return x.astype(jnp.float32)


def load_vqgan(workdir, step=None, *, mesh=None, ema=True, conv_impl='auto') -> TrainedVQGAN:
  """The VQGAN of a stage-1 workdir (a training run or a converted release).

  Args:
    workdir: the run's directory (holds `checkpoints/`).
    step: the checkpoint step; the latest by default.
    mesh: where the parameters live; default: every device on the batch axis.
    ema: use the exponential moving average of the generator's parameters when the run kept
      one (`params_ema` in its state); otherwise, and with ema=False, the trained params.
    conv_impl: the CPU conv kernels it runs on (`kernels.cpu_conv`; 'tuned': the fastest
      measured on this machine). How it computes, not what: the run's own is not read.
  """
  config, step = _saved_config(workdir, step)
  if config.get('stage', 'vqgan') != 'vqgan':
    raise checkpoints.CheckpointError(
      f'{workdir} is a {config.get("stage")!r} run; load_vqgan reads stage-1 (vqgan) '
      'workdirs (load_transformer reads stage-2 ones)'
    )
  mesh = mesh or _default_mesh()
  model = vqgan_lib.from_config(config.model, frozen=True, conv_impl=conv_impl)
  rules = _rules(config)
  params = vqgan_load.restore_vqgan_params(workdir, model, mesh, rules, step=step, ema=ema)
  return TrainedVQGAN(model, params, config, step, mesh)


@dataclasses.dataclass
class TrainedTransformer:
  """A stage-2 transformer with its first stage, ready to sample (jitted): the GPT (KV-cached,
  one code per step) or MaskGIT (parallel decoding in a few steps), per `kind`."""

  model: Any  # the GPT or MaskGIT, per-layer layout (what the samplers run)
  params: Any  # its params
  vqgan: TrainedVQGAN  # the frozen first stage (decodes the codes)
  layout: gpt_load.Layout  # token layout: grid, vocabulary, condition ids
  config: ml_collections.ConfigDict  # the resolved config
  step: int
  mesh: jax.sharding.Mesh
  batch_size: int = 256  # samples per sampler call (more are drawn in several calls)

  @property
  def kind(self) -> str:
    """'gpt' or 'maskgit' (config.transformer.kind)."""
    return self.layout.transformer_kind

  def condition_for_class(self, labels) -> np.ndarray:
    """(N, 1) condition tokens for class ids (class models: integers in [0, n_classes)), or N
    start tokens for an unconditional model."""
    labels = np.asarray(labels).reshape(-1)
    checks.nonempty_batch(labels.shape, 'labels')
    return np.asarray(gpt_load.class_tokens(self.layout, labels))

  def sampler_args(self) -> dict:
    """`sample`'s filter (and, for MaskGIT, decoding) arguments as config.sample sets them:
    what `--mode=sample` and `--mode=eval` draw with."""
    s = self.config.sample
    args = dict(
      temperature=float(s.temperature),
      top_k=int(s.top_k) or None,
      top_p=float(s.top_p),
      cfg_scale=float(s.cfg_scale),
    )
    if self.kind == 'maskgit':
      args.update(
        iterations=int(s.iterations),
        schedule=s.schedule,
        choice_temperature=float(s.choice_temperature),
        confidence=s.confidence,
        final_temperature=_final_temperature(s),
      )
    return args

  def _check_condition(self, condition, num_samples):
    """condition as (B, Lc) host int32 tokens of this model's condition ids; the number of
    samples it asks for."""
    lay = self.layout
    shape = np.shape(condition)
    if len(shape) == 1 and num_samples is not None:
      condition, shape = np.reshape(condition, (1, -1)), (1, *shape)
    if len(shape) != 2 or shape[1] != lay.cond_len:
      raise ValueError(
        f'condition must be (N, {lay.cond_len}) tokens (condition_for_class; a single '
        f'({lay.cond_len},) one with num_samples), got shape {np.shape(condition)}'
      )
    checks.nonempty_batch(shape, 'condition')
    if lay.kind == 'unconditional':
      lo, hi, also, what = lay.sos_id, lay.sos_id + 1, (), 'start tokens'
    elif lay.kind == 'class':
      lo, hi, what = lay.cond_offset, lay.cond_offset + lay.n_classes, 'class tokens'
      also = (lay.null_id,) if lay.null_id >= 0 else ()
    else:
      lo, hi, also, what = lay.cond_offset, lay.cond_offset + lay.cond_n_embed, (), 'cond codes'
    condition = checks.integers(condition, 'condition', lo, hi, also=also, what=what)
    if num_samples is None:
      return condition, len(condition)
    if len(condition) != 1:
      raise ValueError(f'num_samples repeats one condition; got {len(condition)}')
    return condition, checks.count(num_samples, 'num_samples')

  def _check_memory(self, n, num_samples, grid, window, guided):
    """Refuses a call whose batch (at most batch_size samples) would not fit the devices, or
    whose returned codes and images would not fit the host."""
    size = checks.count(self.batch_size, 'batch_size')
    if self.kind == 'maskgit':
      sampler = maskgit_sampling.maskgit_bytes(self.model, self.layout.cond_len, guided)
    else:
      sampler = sampling.gpt_bytes(
        self.model, cond_len=self.layout.cond_len, grid=grid, window=window, guided=guided
      )
    vq = self.vqgan.model
    per = max(sampler, sampling.decode_bytes(vq, grid))
    asked = f'num_samples={n}' if num_samples is not None else f'a batch of {n} conditions'
    what = f'batch_size={size}' if n > size else asked
    checks.fits(per, min(n, size), what, checks.devices_of(self.params), needs=' for the sampler')
    f = self.vqgan.downsample_factor
    out = checks.nbytes(grid[0], grid[1]) * (1 + f * f * vq.out_ch)  # int32 codes, f32 images
    checks.fits(out, n, asked, needs=' for the codes and images returned', hint='ask for at most')
    return size

  def sample(
    self,
    condition=None,
    rng=None,
    *,
    num_samples=None,
    temperature=None,
    top_k=None,
    top_p=1.0,
    cfg_scale=None,
    grid=None,
    window=None,
    iterations=None,
    schedule=None,
    choice_temperature=None,
    confidence=None,
    final_temperature=None,
    steps=None,
  ):
    """Draws code grids and decodes them: returns (codes (N, h, w) int32, images (N, H, W, C)
    float32, nominally [-1, 1]) as host arrays.

    condition: (N, Lc) condition tokens (`condition_for_class`, or cond codes + offset for
      spatial models); None for an unconditional model (then num_samples, default 1).
    num_samples: repeat a single condition that many times (a positive int).
    temperature: > 0 divides the logits; 0 is greedy (argmax) decoding. Default 1.0 (MaskGIT:
      config.sample's temperature and final_temperature, the run's schedule of draws).
    top_k / top_p: keep the k most likely codes / the smallest set with probability >= p.
    cfg_scale: classifier-free guidance (models trained with config.cond.drop_prob > 0).
    grid: (h, w) of the code grid; larger than the training grid uses the sliding window of
      the training grid's side (or `window`). GPT only: MaskGIT samples the training grid.
    iterations, schedule, choice_temperature, confidence, final_temperature (MaskGIT only;
      defaults from config.sample): the number of parallel decoding iterations T, the masking
      schedule ('cosine', 'linear', 'square'), the scale of the Gumbel noise on the confidence,
      what the confidence is ('sampled', MaskGIT's; 'max': `maskgit_sampling.CONFIDENCES`) and
      the draws' temperature at the last iteration (linear from `temperature` at the first).
      A temperature given without final_temperature is the temperature throughout: config's
      final_temperature goes with config's temperature only. steps: the deprecated name of
      iterations.

    Up to `self.batch_size` samples are one sampler call drawn with `rng`; more are drawn in
    calls of batch_size, the i-th with `jax.random.fold_in(rng, i)`. A batch whose estimated
    memory exceeds what the devices have free, or a result larger than the host's free
    memory, is refused with the largest size that fits. Every argument is checked once,
    before anything compiles.
    """
    iterations = maskgit_sampling.renamed_steps(iterations, steps)
    decoding = dict(
      iterations=iterations,
      schedule=schedule,
      choice_temperature=choice_temperature,
      confidence=confidence,
      final_temperature=final_temperature,
    )
    if self.kind != 'maskgit' and any(v is not None for v in decoding.values()):
      given = sorted(k for k, v in decoding.items() if v is not None)
      raise ValueError(f'{given} apply to MaskGIT models; this is a GPT (one code per step)')
    temperature, decoding['final_temperature'] = self._temperatures(temperature, final_temperature)
    rng = jax.random.key(0) if rng is None else rng
    if condition is None:
      if self.layout.kind != 'unconditional':
        raise ValueError(
          f'this {self.layout.kind}-conditional model needs a condition (see condition_for_class)'
        )
      condition = self.condition_for_class([0])
      num_samples = 1 if num_samples is None else num_samples
    condition, n = self._check_condition(condition, num_samples)
    grid, window = self._grid_and_window(grid, window)
    uncond = self._uncond(cfg_scale)
    cfg_scale = None if uncond is None else cfg_scale
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
    draw = self._sampler(condition[:1], uncond, grid, window, decoding, filters)
    size = self._check_memory(n, num_samples, grid, window, cfg_scale is not None)
    return self._in_batches(draw, condition, num_samples, n, size, rng, uncond)

  def _temperatures(self, temperature, final_temperature):
    """(temperature, final_temperature) to draw with. A MaskGIT run's config may warm its draws
    (config.sample.final_temperature); that schedule applies when no temperature is given. A
    temperature given alone is constant: warming it to the config's final temperature would
    draw something the caller did not ask for (guidance_sweep's bug of 2026-12-07)."""
    if self.kind != 'maskgit':
      return 1.0 if temperature is None else temperature, final_temperature
    if temperature is None:
      config = self.sampler_args()
      temperature = config['temperature']
      if final_temperature is None:
        final_temperature = config['final_temperature']
    return temperature, temperature if final_temperature is None else final_temperature

  def _grid_and_window(self, grid, window):
    """The (h, w) grid asked for (default: the training grid) and the sliding window it
    needs (a GPT's training grid side where larger)."""
    layout = self.layout
    grid = checks.grid(tuple(grid or layout.grid))
    if self.kind == 'maskgit' and (grid != tuple(layout.grid) or window is not None):
      raise ValueError(
        f'MaskGIT samples its training grid {tuple(layout.grid)} only (grid={grid}, '
        f'window={window}); larger grids need a GPT and its sliding window'
      )
    if grid != tuple(layout.grid) and window is None:
      if layout.grid[0] != layout.grid[1]:
        raise ValueError(f'the sliding window needs a square training grid, got {layout.grid}')
      if layout.kind == 'spatial':
        raise ValueError(
          'grids larger than the training grid with spatial conditioning need '
          'cond maps of the larger size; not supported'
        )
      window = layout.grid[0]
    return grid, window

  def _uncond(self, cfg_scale):
    """The (1, Lc) null condition that guidance by cfg_scale needs (None: no guidance)."""
    if cfg_scale is None or cfg_scale == 1.0:
      return None
    if self.layout.null_id < 0:
      raise ValueError(
        'cfg_scale needs a model trained with class dropout '
        '(config.cond.drop_prob > 0, offset vocabulary)'
      )
    return np.full((1, self.layout.cond_len), self.layout.null_id, np.int32)

  def _sampler(self, cond_row, uncond, grid, window, decoding, filters):
    """Checks the sampler's arguments for (1, Lc) conditions; returns `draw(params, cond,
    uncond, key)`, the unchecked sampler of `sample_images` on device arrays."""
    if self.kind == 'maskgit':
      defaults = self.sampler_args()
      given = {k: defaults[k] if v is None else v for k, v in decoding.items()}
      dec, checked = maskgit_sampling.check_args(
        self.model, cond_row, uncond_tokens=uncond, **given, **filters
      )
      extra = dict(decoding=dec)
      run = maskgit_sampling.images_of
    else:
      checked = sampling.check_image_args(
        self.model, cond_row, grid=grid, window=window, uncond_tokens=uncond, **filters
      )
      extra = dict(window=window)
      run = sampling.images_of
    model, vq = self.model, self.vqgan.model
    return lambda params, cond, u, key: run(params, model, vq, cond, u, key, checked, grid, **extra)

  def _in_batches(self, draw, condition, num_samples, n, size, rng, uncond):
    """`draw` over batches of at most `size` samples, gathered to the host."""
    rep = parallel.replicated(self.mesh)
    put = lambda a: jax.device_put(np.asarray(a, np.int32), rep)
    params = {'gpt': self.params, 'vqgan': self.vqgan.params}

    def one(cond, key, count):
      # One condition repeated `count` times, or `count` conditions.
      if num_samples is not None:
        cond = np.repeat(cond, count, axis=0)
      u = None if uncond is None else put(np.repeat(uncond, len(cond), axis=0))
      codes, images = draw(params, put(cond), u, key)
      return parallel.gather(codes), parallel.gather(images)

    if n <= size:
      return one(condition, rng, n)
    out = []
    for i, start in enumerate(range(0, n, size)):
      stop = min(n, start + size)
      cond = condition
      if num_samples is None:  # the last batch padded: one compiled shape for every call
        cond = condition[start:stop]
        cond = np.concatenate([cond, np.repeat(cond[-1:], size - len(cond), axis=0)])
      codes, images = one(cond, jax.random.fold_in(rng, i), size)
      out.append((codes[: stop - start], images[: stop - start]))
    return np.concatenate([c for c, _ in out]), np.concatenate([x for _, x in out])

  def complete(self, images_or_codes, keep, rng=None, *, condition=None, **sampling_args):
    """Completion and inpainting (`completion.py`): returns (codes (N, h, w) int32, images
    (N, H, W, C) float32) with the codes where `keep` is set unchanged, the rest generated.

    images_or_codes: (N, h, w) integer code grids of the training grid, or images
      (`TrainedVQGAN.encode`'s: uint8, or floats in [-1, 1]) that encode to that grid.
    keep: an (h, w) boolean mask over the code grid (`completion.KEEP_MASKS`: top_half,
      left_half, center_box, outside_center_box); a GPT needs a raster prefix (top_half).
    condition: (N, Lc) condition tokens (`condition_for_class(labels)`); default: the start
      token of an unconditional model, the null class of one trained with class dropout.
    sampling_args: `sample`'s temperature, top_k, top_p, cfg_scale (and MaskGIT's iterations,
      schedule, choice_temperature, confidence, final_temperature; config.sample's by default,
      the temperatures as `sample` resolves them). Batches of batch_size as
      `sample`: the i-th with `fold_in(rng, i)` when there are several.
    """
    grid = tuple(self.layout.grid)
    codes = self._completion_codes(images_or_codes)
    keep = completion.check_keep(keep, grid)
    if self.kind == 'gpt':
      completion.prefix_length(keep)  # refused before anything compiles
    n = len(codes)
    condition = self._completion_condition(condition, n)
    kw = self._completion_args(sampling_args)
    cfg_scale = kw.pop('cfg_scale', None)
    uncond = self._uncond(cfg_scale)
    cfg_scale = None if uncond is None else cfg_scale
    size = self._check_memory(n, None, grid, None, cfg_scale is not None)
    rng = jax.random.key(0) if rng is None else rng
    rep = parallel.replicated(self.mesh)
    put = lambda a: jax.device_put(np.asarray(a, np.int32), rep)
    flat = codes.reshape(n, -1)
    out_codes, out_images = [], []
    for i, start in enumerate(range(0, n, size)):
      stop = min(n, start + size)
      # The last batch padded: one compiled shape for every call.
      rows = np.minimum(np.arange(start, start + min(size, n)), n - 1)
      c = completion.complete_codes(
        self.params,
        self.model,
        self.kind,
        put(condition[rows]),
        put(flat[rows]),
        keep,
        rng if n <= size else jax.random.fold_in(rng, i),
        cfg_scale=cfg_scale,
        uncond_tokens=None if uncond is None else put(np.repeat(uncond, len(rows), axis=0)),
        **kw,
      ).reshape(-1, *grid)
      images = sampling.decode_codes(self.vqgan.model, self.vqgan.params, c)
      out_codes.append(parallel.gather(c)[: stop - start])
      out_images.append(parallel.gather(images)[: stop - start])
    return np.concatenate(out_codes), np.concatenate(out_images)

  def _completion_codes(self, images_or_codes):
    """(N, h, w) codes of the training grid: given as codes, or encoded from images."""
    lay = self.layout
    grid = tuple(lay.grid)
    x = np.asarray(images_or_codes)
    if x.ndim == 3 and x.shape[1:] == grid and np.issubdtype(x.dtype, np.integer):
      checks.nonempty_batch(x.shape, 'images_or_codes')
      return checks.integers(x, 'images_or_codes', 0, lay.n_image, what='code indices')
    codes = self.vqgan.encode(x)
    if codes.shape[1:] != grid:
      raise ValueError(
        f'images_or_codes: images of {x.shape[1:3]} encode to a {codes.shape[1:]} code grid; '
        f'completion needs the training grid {grid}'
      )
    return codes

  def _completion_condition(self, condition, n):
    """(n, Lc) checked condition tokens; by default the start token of an unconditional
    model or the null class of one trained with class dropout."""
    lay = self.layout
    if condition is None:
      if lay.kind == 'unconditional':
        condition = self.condition_for_class(np.zeros(n, np.int32))
      elif lay.null_id >= 0:
        condition = np.full((n, lay.cond_len), lay.null_id, np.int32)
      else:
        raise ValueError(
          f'this {lay.kind}-conditional model needs a condition for completion '
          '(condition_for_class(labels))'
        )
    condition, _ = self._check_condition(condition, None)
    if len(condition) != n:
      raise ValueError(f'condition has {len(condition)} rows for {n} images_or_codes')
    return condition

  def _completion_args(self, sampling_args):
    """`complete`'s sampler keywords, MaskGIT's decoding ones defaulting to config.sample's."""
    kw = dict(sampling_args)
    allowed = {'temperature', 'top_k', 'top_p', 'cfg_scale'}
    if self.kind == 'maskgit':
      allowed |= {'iterations', 'steps', *maskgit_sampling.DECODING_ARGS}
    if set(kw) - allowed:
      raise ValueError(
        f'complete takes {sorted(allowed)} for a {self.kind}; got {sorted(set(kw) - allowed)}'
      )
    if self.kind == 'maskgit':
      steps = kw.pop('steps', None)
      kw['iterations'] = maskgit_sampling.renamed_steps(kw.get('iterations'), steps)
      for k, v in self.sampler_args().items():
        if k in maskgit_sampling.DECODING_ARGS and k != 'final_temperature' and kw.get(k) is None:
          kw[k] = v
    temperature, final = self._temperatures(kw.get('temperature'), kw.get('final_temperature'))
    kw['temperature'] = temperature
    if self.kind == 'maskgit':
      kw['final_temperature'] = final
    return kw


def load_transformer_for_config(config, workdir, step=None, mesh=None) -> TrainedTransformer:
  """`load_transformer` under a given stage-2 config (e.g. a run's own, with its `sample`
  and `stage1_workdir` overrides), checked against the saved one."""
  mesh = mesh or _default_mesh()
  saved, step = _saved_config(workdir, step)
  if saved.get('stage') != 'transformer':
    raise checkpoints.CheckpointError(
      f'{workdir} is a {saved.get("stage", "vqgan")!r} run; load_transformer reads stage-2 '
      '(transformer) workdirs (load_vqgan reads stage-1 ones)'
    )
  config = gpt_load.resolve_config(config)
  run_config.check_compatible(
    saved.to_dict(),
    config,
    tuple(f for f in gpt_load.COMPATIBILITY_FIELDS if f != 'transformer.scan_layers'),
    where=workdir,
  )
  layout = gpt_load.make_layout(config)
  rules = _rules(config)
  model = gpt_load.build_model(config, layout, scan_layers=False)
  params = gpt_load.restore_gpt_params(
    workdir, model, mesh, saved.to_dict(), rules=rules, step=step
  )
  frozen, frozen_params, _ = gpt_load.load_frozen(config, layout, mesh, cond=False)
  # The codes the run trained on must be the codes this stage 1 decodes.
  codes_lib.check_codes_of_run(config, workdir, frozen.stage1_id)
  vq = TrainedVQGAN(
    frozen.stage1,
    frozen_params['stage1'],
    ml_collections.ConfigDict({'stage': 'vqgan', 'model': config.stage1_config.to_dict()}),
    frozen.stage1_id['step'],
    mesh,
  )
  return TrainedTransformer(model, params, vq, layout, config, step, mesh)


def load_transformer(workdir, step=None, *, mesh=None, stage1_workdir=None) -> TrainedTransformer:
  """The transformer of a stage-2 workdir (a training run or a converted release) and the
  stage-1 VQGAN its config names.

  Args:
    workdir: the run's directory (holds `checkpoints/`).
    step: the checkpoint step; the latest by default.
    mesh: where the parameters live; default: every device on the batch axis.
    stage1_workdir: the first stage's workdir, when it moved since training (default: the
      one the saved config names).
  """
  config, _ = _saved_config(workdir, step)
  if stage1_workdir is not None:
    config.stage1_workdir = stage1_workdir
  return load_transformer_for_config(config, workdir, step, mesh or _default_mesh())
