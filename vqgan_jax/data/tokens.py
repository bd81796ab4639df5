"""The codes dataset: a stage-1 VQGAN's code indices of a dataset, for stage-2 training.

Written once by `--mode=encode` (the LlamaGen pattern) as a TFDS array_record dataset:

  <codes_dir>/vqgan_codes/<name>/1.0.0/    codes_dir: config.data.codes_dir or <workdir>/codes
    vqgan_codes-<split>.array_record-*     one record per source example, in source order
    dataset_info.json, features.json       + metadata.json (grid, n_embed, stage-1 run/step,
                                           the tokenizer identity: see encode.py)

Features per record:
  codes       uint16 (int32 if n_embed > 65536) [h*w]   image codes, row-major
  label       int32                                     class (-1: unlabelled)
  index       int64                                     the record's index in the source split
  cond_codes  like codes [hc*wc]                        spatial conditioning only

Images are encoded with the eval preprocessing (resize + centre crop), so the codes are
fixed per image (no crop augmentation across epochs, unlike on-the-fly encoding).

With several processes, every process encodes its slice of each global batch on the mesh;
process 0 gathers the codes and writes the dataset (codes_dir must then be shared), the
others wait for it. Stage-2 training reads it with grain: deterministic shuffling, each
process loading its slice of every global batch, a checkpointable iterator state; evaluation
makes one ordered, padded pass.
"""

import os
import re
import shutil
import time

import grain
import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from vqgan_jax.data import builders
from vqgan_jax.data import pipeline

DataError = builders.DataError

DATASET_NAME = 'vqgan_codes'
VERSION = '1.0.0'


def code_dtype(n_embed):
  return np.uint16 if n_embed <= 2**16 else np.int32


def codes_name(data_config):
  """The builder config name of a source dataset's codes (one per dataset and image size)."""
  base = re.sub(r'[^a-z0-9]+', '_', f'{data_config.name}_{data_config.image_size}'.lower())
  if data_config.name == 'folder':
    base += '_' + re.sub(
      r'[^a-z0-9]+', '_', os.path.basename(os.path.normpath(data_config.folder)).lower()
    )
  return base.strip('_') or 'codes'


def dataset_path(codes_dir, name):
  return os.path.join(os.path.abspath(os.path.expanduser(codes_dir)), DATASET_NAME, name, VERSION)


def base_splits(*splits):
  """'train', 'train[:10%]', 'train+validation' -> the base split names, in order, once."""
  out = []
  for split in splits:
    for part in str(split).split('+'):
      name = part.split('[', 1)[0].strip()
      if name and name not in out:
        out.append(name)
  return out


# ----------------------------------------------------------------------------
# Reading images (and cond maps) in order, for encoding.


def _gray(x):
  x = np.asarray(x)
  if x.ndim == 3:
    x = x[..., :3].mean(axis=-1) if x.shape[-1] >= 3 else x[..., 0]
  if x.dtype != np.uint8:
    x = x.astype(np.float64)
    if x.max(initial=0) <= 1.0:
      x = x * 255.0
    x = np.clip(np.round(x), 0, 255)
  return x.astype(np.uint8)


def _resize_crop(x, size, resample):
  h, w = x.shape[:2]
  if min(h, w) != size:
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    x = np.asarray(Image.fromarray(x).resize(new, resample))
  return pipeline.crop(x, size)


def preprocess_cond_map(x, size, one_hot=0, labels_from_intensity=False):
  """A cond map, cropped like its image: label maps (nearest) -> int32 [S, S]; other maps
  (depth) -> uint8 gray [S, S, 1]. `labels_from_intensity` (smoke tests) quantizes a gray
  image into `one_hot` labels."""
  x = np.asarray(x)
  if one_hot:
    if labels_from_intensity:
      x = (_gray(x).astype(np.int32) * one_hot) // 256
    elif x.ndim == 3:
      x = x[..., 0]
    if x.max(initial=0) >= one_hot or x.min(initial=0) < 0:
      raise DataError(f'cond label map has labels outside [0, {one_hot}) (config.cond.one_hot)')
    out = _resize_crop(x.astype(np.int32), size, Image.Resampling.NEAREST)
    return np.ascontiguousarray(out, np.int32)
  g = _gray(x)
  shrink = min(g.shape[:2]) > size
  g = _resize_crop(g, size, Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
  return np.ascontiguousarray(g[..., None])


class _OrderedSource(pipeline.ProcessSlice):
  """Images, labels and source indices (and cond maps) of a split in source order; padding
  has mask False."""

  def __init__(
    self, source, data_config, num_examples, global_batch, local_batch, process_index, cond=None
  ):
    super().__init__(num_examples, global_batch, local_batch, process_index)
    self._source, self._cfg, self._cond = source, data_config, cond

  def example(self, index):
    size = self._cfg.image_size
    valid = index is not None
    element = self._source[index] if valid else None
    out = {'index': np.int32(index if valid else -1), 'mask': np.bool_(valid)}
    if valid:
      out['image'] = pipeline.preprocess(element[self._cfg.image_key], size)
      out['label'] = np.int32(element.get('label', -1))
    else:
      out['image'] = np.zeros((size, size, 3), np.uint8)
      out['label'] = np.int32(-1)
    if self._cond is not None:
      one_hot = int(self._cond.one_hot)
      if valid:
        if self._cond.key not in element:
          raise DataError(
            f'config.cond.key={self._cond.key!r} is not a feature of the '
            f'dataset; it has {sorted(element)}'
          )
        out['cond_map'] = preprocess_cond_map(
          element[self._cond.key], size, one_hot, bool(self._cond.labels_from_intensity)
        )
      else:
        out['cond_map'] = (
          np.zeros((size, size), np.int32) if one_hot else np.zeros((size, size, 1), np.uint8)
        )
    return out


def ordered_batches(
  data_config,
  split,
  global_batch,
  *,
  cond=None,
  max_examples=-1,
  process_index=None,
  process_count=None,
  source=None,
):
  """One ordered pass over a split for encoding: local batches {'image' uint8 [B,S,S,3],
  'label', 'index', 'mask'[, 'cond_map']}, B = global_batch / process_count.

  Returns (iterator, number of real examples).
  """
  process_index, process_count = pipeline._process(process_index, process_count)  # pylint: disable=protected-access
  local = pipeline.local_batch_size(global_batch, process_count, 'encode.batch_size')
  if source is None:
    source = builders.get_source(data_config, split)
  n = len(source) if max_examples is None or max_examples < 0 else min(len(source), max_examples)
  padded = _OrderedSource(source, data_config, n, global_batch, local, process_index, cond)
  ds = grain.MapDataset.source(padded).batch(local, drop_remainder=False)
  ds = ds.to_iter_dataset(pipeline.read_options(data_config, source))
  workers = int(data_config.worker_count)
  if workers:
    pipeline._allow_workers(workers)  # pylint: disable=protected-access
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(ds), n


# ----------------------------------------------------------------------------
# The builder.


class VqganCodes(tfds.core.GeneratorBasedBuilder):
  """Code indices of a dataset under a frozen VQGAN (see the module docstring).

  Built with `examples(split)`: a callable yielding dicts of numpy arrays, one row per
  example ('codes' [n, L], 'label' [n], 'index' [n][, 'cond_codes' [n, Lc]]).
  """

  VERSION = tfds.core.Version(VERSION)

  def __init__(
    self,
    *,
    name,
    splits,
    seq_len,
    n_embed,
    cond_len=0,
    cond_n_embed=0,
    examples=None,
    metadata=None,
    **kwargs,
  ):
    self._codes_name, self._splits = name, list(splits)
    self._seq_len, self._n_embed = int(seq_len), int(n_embed)
    self._cond_len, self._cond_n_embed = int(cond_len), int(cond_n_embed)
    self._examples, self._metadata = examples, dict(metadata or {})
    super().__init__(file_format='array_record', **kwargs)

  def _info(self):
    features = {
      'codes': tfds.features.Tensor(shape=(self._seq_len,), dtype=code_dtype(self._n_embed)),
      'label': tfds.features.Scalar(dtype=np.int32),
      'index': tfds.features.Scalar(dtype=np.int64),
    }
    if self._cond_len:
      features['cond_codes'] = tfds.features.Tensor(
        shape=(self._cond_len,), dtype=code_dtype(self._cond_n_embed)
      )
    return tfds.core.DatasetInfo(
      builder=self,
      description='VQGAN code indices of a dataset (vqgan_jax --mode=encode).',
      features=tfds.features.FeaturesDict(features),
      metadata=tfds.core.MetadataDict(self._metadata),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split):
    dtype = code_dtype(self._n_embed)
    cdtype = code_dtype(self._cond_n_embed)
    for rows in self._examples(split):
      for i in range(len(rows['index'])):
        ex = {
          'codes': rows['codes'][i].astype(dtype),
          'label': int(rows['label'][i]),
          'index': int(rows['index'][i]),
        }
        if self._cond_len:
          ex['cond_codes'] = rows['cond_codes'][i].astype(cdtype)
        yield int(rows['index'][i]), ex


def is_prepared(path):
  return os.path.exists(os.path.join(path, 'dataset_info.json'))


def write_codes(
  codes_dir,
  name,
  *,
  splits,
  examples,
  seq_len,
  n_embed,
  cond_len=0,
  cond_n_embed=0,
  metadata=None,
  overwrite=False,
  timeout_s=24 * 3600.0,
):
  """Writes the codes dataset (process 0) while every process runs `examples(split)`
  (the encoding is collective). Returns the dataset's path.

  Args:
    examples: `examples(split)` yields dicts of numpy rows (see `VqganCodes`); every process
      must iterate it fully, in `splits` order; only process 0's rows are written.
  """
  path = dataset_path(codes_dir, name)
  chief = jax.process_index() == 0
  if is_prepared(path) and not overwrite:
    raise DataError(
      f'The codes dataset {path} exists already; pass '
      '--config.encode.overwrite=True to encode again.'
    )
  if chief:
    if os.path.exists(path):
      shutil.rmtree(path)
    # Built under _build/<name> (TFDS names the folder after the builder), then moved into
    # place, so readers never see a half-written dataset; a stale build is discarded.
    build_dir = os.path.join(os.path.abspath(os.path.expanduser(codes_dir)), '_build', name)
    shutil.rmtree(build_dir, ignore_errors=True)
    builder = VqganCodes(
      name=name,
      splits=splits,
      seq_len=seq_len,
      n_embed=n_embed,
      cond_len=cond_len,
      cond_n_embed=cond_n_embed,
      examples=examples,
      metadata=metadata,
      data_dir=build_dir,
    )
    builder.download_and_prepare()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(os.fspath(builder.data_path), path)
    shutil.rmtree(build_dir, ignore_errors=True)
  else:
    for split in splits:
      for _ in examples(split):
        pass
    deadline = time.time() + timeout_s
    while not is_prepared(path):
      if time.time() > deadline:
        raise DataError(
          f'Waited {timeout_s:.0f} s for process 0 to write {path}; '
          'config.data.codes_dir must be shared between hosts.'
        )
      time.sleep(1.0)
  return path


def open_codes(codes_dir, name):
  """The prepared codes dataset's builder; a clear error if --mode=encode has not run."""
  path = dataset_path(codes_dir, name)
  if not is_prepared(path):
    raise DataError(
      f'No codes dataset at {path}: run --mode=encode with this config and '
      "workdir first (or set config.data.source='images' to encode in the "
      'training step).'
    )
  return tfds.builder_from_directory(path)


def metadata(builder):
  return dict(builder.info.metadata or {})


# ----------------------------------------------------------------------------
# Stage-2 iterators.


def crop_codes(codes, grid, window, rng=None):
  """A window x window crop of a row-major code grid `grid` (h, w) stored flat (h*w,), flat:
  uniformly placed with `rng` (a numpy Generator), else centred (`pipeline.crop`)."""
  return np.ascontiguousarray(pipeline.crop(np.reshape(codes, grid), window, rng)).reshape(-1)


class _CropCodes(grain.transforms.RandomMap):
  """A random window of each record's code grid (as the original random-crops its
  high-resolution images), with the rng grain derives from (seed, record index): the same
  crops per seed, and a resumed iterator continues them exactly."""

  def __init__(self, crop):
    self._grid, self._window = crop

  def random_map(self, element, rng):
    return dict(element, codes=crop_codes(element['codes'], self._grid, self._window, rng))


class _ToArrays(grain.transforms.Map):
  """A decoded record -> int32 arrays (labels, codes), dropping the bookkeeping index;
  `crop` ((h, w), window): the codes' centred window."""

  def __init__(self, crop=None):
    self._crop = crop

  def map(self, element):
    codes = np.asarray(element['codes'], np.int32)
    if self._crop is not None:
      codes = crop_codes(codes, *self._crop)
    out = {
      'codes': codes,
      'label': np.int32(element.get('label', -1)),
    }
    if 'cond_codes' in element:
      out['cond_codes'] = np.asarray(element['cond_codes'], np.int32)
    return out


def get_source(builder, split):
  return builders.source_from_builder(builder, split)


def check_splits(builder, data_config, fields=('train_split', 'eval_split')):
  """Raises DataError, before step 1, when the codes dataset lacks a split that
  `config.data.<field>` names (it holds the splits --mode=encode wrote)."""
  builders.check_builder_splits(
    builder,
    {f'config.data.{f}': data_config[f] for f in fields},
    hint=' (the codes dataset holds the splits --mode=encode wrote: encode '
    'again with --config.encode.overwrite=True after changing the splits)',
  )


def make_train_iterator(
  builder,
  split,
  global_batch_size,
  seed,
  *,
  worker_count=0,
  process_index=None,
  process_count=None,
  source=None,
  options=None,
  crop=None,
):
  """Infinite shuffled batches {'codes' int32 [B, L], 'label' [B][, 'cond_codes']}: this
  process's part of each global batch (the same global batches for any process count, see
  `pipeline.GlobalBatchSampler`); the state (`get_state`/`set_state`) is checkpointed with
  the run. `options`: grain ReadOptions (`pipeline.read_options`). `crop` ((h, w), window):
  each record's codes are a random window x window crop of its h x w grid
  (`gpt_load.Layout.crop`; L = window**2)."""
  process_index, process_count = pipeline._process(process_index, process_count)  # pylint: disable=protected-access
  pipeline.local_batch_size(global_batch_size, process_count, 'train.batch_size')
  if source is None:
    source = get_source(builder, split)
  if len(source) < global_batch_size:
    raise DataError(
      f'Codes split {split!r} has {len(source)} examples: too few for '
      f'train.batch_size={global_batch_size}.'
    )
  return pipeline.make_loader(
    source,
    [_ToArrays()] + ([_CropCodes(crop)] if crop is not None else []),
    global_batch_size,
    seed,
    worker_count=worker_count,
    process_index=process_index,
    process_count=process_count,
    options=options,
  )


class _PaddedCodes(pipeline.ProcessSlice):
  """Code records in order; padding is zeros (label -1) with mask False."""

  def __init__(self, source, num_examples, global_batch, local_batch, process_index, crop=None):
    super().__init__(num_examples, global_batch, local_batch, process_index)
    self._source = source
    self._blank = None
    self._arrays = _ToArrays(crop)

  def example(self, index):
    if index is not None:
      return dict(self._arrays.map(self._source[index]), mask=np.bool_(True))
    if self._blank is None:
      first = self._arrays.map(self._source[0])
      self._blank = {k: np.zeros_like(v) for k, v in first.items()}
      self._blank['label'] = np.int32(-1)
    return dict(self._blank, mask=np.bool_(False))


def make_eval_iterator(
  builder,
  split,
  global_batch_size,
  *,
  max_examples=-1,
  process_index=None,
  process_count=None,
  source=None,
  options=None,
  crop=None,
):
  """One ordered pass over a codes split: {'codes', 'label', 'mask'[, 'cond_codes']},
  padded to whole batches (mask False), the same number of batches on every process.
  `options`: grain ReadOptions (`pipeline.read_options`). `crop` ((h, w), window): each
  record's centred window (fixed, so held-out measures compare across runs)."""
  process_index, process_count = pipeline._process(process_index, process_count)  # pylint: disable=protected-access
  batch = pipeline.local_batch_size(global_batch_size, process_count, 'train.eval_batch_size')
  if source is None:
    source = get_source(builder, split)
  if not len(source):
    raise DataError(f'Codes split {split!r} is empty.')
  n = len(source) if max_examples is None or max_examples < 0 else min(len(source), max_examples)
  padded = _PaddedCodes(source, n, global_batch_size, batch, process_index, crop)
  return iter(
    grain.MapDataset.source(padded).batch(batch, drop_remainder=False).to_iter_dataset(options)
  )
