"""Grain input pipelines: uint8 NHWC batches, sharded by JAX process.

Train: `grain.DataLoader` over one global `IndexSampler` stream (infinite,
reshuffled every epoch); each process loads only its slice of every global
batch, so the global batches do not depend on the process count. The iterator
state is a small JSON document, so a resumed run sees exactly the batches an
uninterrupted one would.
Eval: one ordered pass, padded to whole batches with a `mask`; process p loads
its slice of each global batch.
"""

import json
import math
import sys

from absl import flags
import grain
import jax
import numpy as np
from PIL import Image

from vqgan_jax.data import builders

DataError = builders.DataError


# ----------------------------------------------------------------------------
# Checking a run's splits up front.


def check_splits(data_config, fields=('train_split', 'eval_split'), *, is_chief=None):
  """Prepares `config.data`'s dataset and checks that every split the run
  will read exists, so a wrong eval split fails before step 1, not at the
  first eval; returns the prepared builder.

  fields: the `config.data` fields naming splits the run reads (leave out
  eval_split when the run never evaluates). Raises DataError naming the
  field, the split and the splits that exist.
  """
  builder = builders.prepare(data_config, is_chief=is_chief)
  hint = ''
  if data_config.name == 'folder':
    hint = (
      " (a folder has 'train', and 'validation' when "
      "config.data.eval_split='validation' and "
      'config.data.validation_fraction > 0 leave at least one image '
      'out)'
    )
  builders.check_builder_splits(
    builder, {f'config.data.{f}': data_config[f] for f in fields}, hint=hint
  )
  return builder


# ----------------------------------------------------------------------------
# Per-example preprocessing.


def channels_to_rgb(image):
  """A decoded uint8 array [H,W], [H,W,1|2|3|4] -> [H,W,3]: gray repeated,
  alpha composited on white (as `builders.pil_to_rgb` does for PIL images)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  channels = image.shape[-1]
  if channels in (2, 4):
    alpha = image[..., -1:].astype(np.float32) / 255.0
    color = image[..., :-1].astype(np.float32)
    image = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    channels -= 1
  if channels == 1:
    image = np.repeat(image, 3, axis=-1)
  elif channels != 3:
    raise DataError(f'Cannot turn an image of shape {image.shape} into RGB.')
  return image.astype(np.uint8, copy=False)


def resize_smaller_side(image, size):
  """Scales so the smaller side is `size`, keeping the aspect ratio.

  Shrinking uses PIL's BOX filter, which is area averaging like the original's
  albumentations SmallestMaxSize (cv2.INTER_AREA) and does not alias;
  enlarging (e.g. Fashion-MNIST 28 -> 32) uses BICUBIC, which stays smooth
  where area/box would repeat pixels.
  """
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  new_w = size if w <= h else max(size, round(w * scale))
  new_h = size if h < w else max(size, round(h * scale))
  resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))


def crop(image, size, rng=None):
  """size x size crop: uniformly random when `rng` is given, else centred."""
  h, w = image.shape[:2]
  if rng is None:
    top, left = (h - size) // 2, (w - size) // 2
  else:
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
  return image[top : top + size, left : left + size]


def preprocess(image, size, rng=None):
  """Decoded image -> uint8 [size, size, 3]: RGB, resize, crop."""
  return np.ascontiguousarray(crop(resize_smaller_side(channels_to_rgb(image), size), size, rng))


def _example(element, image, mask=None):
  out = {'image': image, 'label': np.int32(element.get('label', -1))}  # -1: unlabelled
  if mask is not None:
    out['mask'] = np.bool_(mask)
  return out


class _TrainPreprocess(grain.transforms.RandomMap):
  """Random crop with an rng grain derives from (seed, record index)."""

  def __init__(self, data_config):
    self._key = data_config.image_key
    self._size = data_config.image_size
    self._random = bool(data_config.random_crop)

  def random_map(self, element, rng):
    image = preprocess(element[self._key], self._size, rng if self._random else None)
    return _example(element, image)


# ----------------------------------------------------------------------------
# Iterators.


def _process(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} not in [0, {process_count}).')
  return process_index, process_count


def local_batch_size(global_batch_size, process_count, field):
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(
      f'{field}={global_batch_size} must be a positive multiple of the '
      f'number of processes ({process_count}): each process loads '
      f'{field} / {process_count} examples.'
    )
  return global_batch_size // process_count


def read_options(data_config, source=None):
  """grain's reading threads for `data_config`: none for a `MemorySource` (grain's advice for
  data in memory) or with `config.data.read_threads=0`, else that many with grain's default
  prefetch buffer. With its 16 default threads grain's prefetch re-scans a 500-deep buffer
  for every record and the threads fight the main one for the GIL: on a 2-core host
  Fashion-MNIST loaded 984 images/s that way and 1718 without threads."""
  threads = int(data_config.get('read_threads', 16))
  if threads == 0 or isinstance(source, builders.MemorySource):
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.ReadOptions(num_threads=threads)


def _allow_workers(worker_count):
  # Grain worker processes read absl flags; outside an absl app (tests,
  # notebooks) they are unparsed and the workers would fail.
  if worker_count and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainIterator:
  """Infinite iterator of local batches with a JSON-able state.

  `get_state()` returns a str; `set_state(state)` restores it (str, bytes or
  the parsed dict), after which `next()` continues exactly where the saved
  iterator stood. `grain_iterator` is the underlying
  `grain.DataLoaderIterator` (for orbax's grain checkpoint handler).
  """

  def __init__(self, loader):
    self._loader = loader
    self.grain_iterator = iter(loader)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.grain_iterator)

  def get_state(self):
    return self.grain_iterator.get_state().decode('utf-8')

  def set_state(self, state):
    if isinstance(state, dict):
      state = json.dumps(state)
    if isinstance(state, str):
      state = state.encode('utf-8')
    self.grain_iterator.set_state(state)


class GlobalBatchSampler:
  """Sampler of one process's part of every global training batch.

  The global stream is one `grain.samplers.IndexSampler` over the whole split
  (shuffled with `seed`, reshuffled every epoch, a per-position rng for random
  crops); global batch n is its positions [n*G, (n+1)*G), and process p loads
  only positions n*G + p*L + [0, L) of it (G global, L local batch size).
  grain's DataLoader gives worker w of W the sampler indices j = w (mod W),
  batches L consecutive ones inside that worker and emits the workers' batches
  round robin; `__getitem__` undoes that, so the n-th local batch is this
  process's slice of global batch n for *any* process and worker count: a run
  on 2 hosts trains on exactly the batches a run on 1 host does.
  """

  def __init__(self, num_records, global_batch, local_batch, process_index, seed, worker_count=0):
    # ShardOptions(0, 1) rather than NoSharding: the same sampler (and repr)
    # that one process used before, so its iterator checkpoints still load.
    self._base = grain.samplers.IndexSampler(
      num_records=num_records,
      shard_options=grain.sharding.ShardOptions(shard_index=0, shard_count=1, drop_remainder=True),
      shuffle=True,
      num_epochs=None,
      seed=int(seed) % 2**32,
    )
    self._global, self._local = int(global_batch), int(local_batch)
    self._process = int(process_index)
    self._workers = max(int(worker_count), 1)

  def __len__(self):
    return sys.maxsize

  def global_position(self, j):
    """The position in the global stream of this process's sampler index j."""
    w, k = j % self._workers, j // self._workers
    n = (k // self._local) * self._workers + w  # the local (= global) batch
    return n * self._global + self._process * self._local + k % self._local

  def __getitem__(self, j):
    meta = self._base[self.global_position(j)]
    return grain.RecordMetadata(index=j, record_key=meta.record_key, rng=meta.rng)

  def __repr__(self):
    if self._global == self._local and self._workers == 1:
      return repr(self._base)  # One process, no workers: the plain stream.
    return (
      f'GlobalBatchSampler({self._base!r}, global_batch={self._global}, '
      f'local_batch={self._local}, process_index={self._process}, '
      f'workers={self._workers})'
    )


def make_loader(
  source,
  operations,
  global_batch_size,
  seed,
  *,
  worker_count,
  process_index=None,
  process_count=None,
  field='train.batch_size',
  options=None,
):
  """An infinite `TrainIterator` of this process's part of each global batch
  (see `GlobalBatchSampler`); `operations` map one record and batch them; `options`: grain
  ReadOptions (`read_options`)."""
  process_index, process_count = _process(process_index, process_count)
  batch = local_batch_size(global_batch_size, process_count, field)
  sampler = GlobalBatchSampler(
    len(source), global_batch_size, batch, process_index, seed, worker_count
  )
  worker_count = int(worker_count)
  _allow_workers(worker_count)
  loader = grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[*operations, grain.transforms.Batch(batch, drop_remainder=True)],
    worker_count=worker_count,
    shard_options=grain.sharding.NoSharding(),
    read_options=options,
  )
  return TrainIterator(loader)


def make_train_iterator(
  data_config, global_batch_size, seed, *, process_index=None, process_count=None, source=None
):
  """Infinite shuffled batches {'image': uint8 [B,S,S,3], 'label': int32 [B]},
  B = global_batch_size / process_count: this process's part of each global
  batch (`GlobalBatchSampler`: the same global batches for any process count).

  The same seed gives the same batches; each epoch is reshuffled. `source`
  overrides the dataset (tests); by default it is `config.data.train_split`.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch_size(global_batch_size, process_count, 'train.batch_size')
  if source is None:
    source = builders.get_source(data_config, data_config.train_split)
  if len(source) < global_batch_size:
    raise DataError(
      f'Split {data_config.train_split!r} has {len(source)} examples: too '
      f'few for train.batch_size={global_batch_size}.'
    )
  return make_loader(
    source,
    [_TrainPreprocess(data_config)],
    global_batch_size,
    seed,
    worker_count=data_config.worker_count,
    process_index=process_index,
    process_count=process_count,
    options=read_options(data_config, source),
  )


def num_eval_examples(data_config, *, source=None):
  """Examples one eval pass covers: the split, or its first eval_examples."""
  if source is None:
    source = builders.get_source(data_config, data_config.eval_split)
  limit = int(data_config.eval_examples)
  return min(len(source), limit) if limit > 0 else len(source)


class ProcessSlice:
  """This process's part of each global batch of one ordered pass, padded past the end.

  Global batch b holds examples [b*G, (b+1)*G); process p takes the slice
  [b*G + p*L, b*G + (p+1)*L), so all processes run the same number of
  batches and the assembled global batch is in dataset order. Subclasses
  give `example(index)`: the element at `index`, or padding for None.
  """

  def __init__(self, num_examples, global_batch, local_batch, process_index):
    self._n = num_examples
    self._global = global_batch
    self._local = local_batch
    self._offset = process_index * local_batch
    self._len = math.ceil(num_examples / global_batch) * local_batch

  def __len__(self):
    return self._len

  def __getitem__(self, k):
    index = (k // self._local) * self._global + self._offset + k % self._local
    return self.example(index if index < self._n else None)

  def example(self, index):
    raise NotImplementedError


class _PaddedEvalSource(ProcessSlice):
  """Eval images and labels; padding has mask False, and so has an element whose source
  marks it {'mask': False} (a folder file that does not decode, see evaluate.py)."""

  def __init__(self, source, data_config, num_examples, global_batch, local_batch, process_index):
    super().__init__(num_examples, global_batch, local_batch, process_index)
    self._source = source
    self._key = data_config.image_key
    self._size = data_config.image_size

  def example(self, index):
    if index is None:
      return {
        'image': np.zeros((self._size, self._size, 3), np.uint8),
        'label': np.int32(-1),
        'mask': np.bool_(False),
      }
    element = self._source[index]
    mask = bool(element.get('mask', True))
    return _example(element, preprocess(element[self._key], self._size), mask=mask)


def make_eval_iterator(
  data_config, global_batch_size, *, process_index=None, process_count=None, source=None
):
  """One ordered pass over the eval split (first eval_examples if > 0).

  Yields {'image': uint8 [B,S,S,3], 'label': int32 [B], 'mask': bool [B]}
  with B = global_batch_size / process_count; padding has mask False, so
  every batch has one shape. Every process yields the same number of batches.
  """
  process_index, process_count = _process(process_index, process_count)
  batch = local_batch_size(global_batch_size, process_count, 'train.eval_batch_size')
  if source is None:
    source = builders.get_source(data_config, data_config.eval_split)
  n = num_eval_examples(data_config, source=source)
  padded = _PaddedEvalSource(source, data_config, n, global_batch_size, batch, process_index)
  ds = grain.MapDataset.source(padded).batch(batch, drop_remainder=False)
  it_ds = ds.to_iter_dataset(read_options(data_config, source))
  worker_count = int(data_config.worker_count)
  if worker_count:
    _allow_workers(worker_count)
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def to_global(batch, sharding):
  """Per-process numpy batches -> global jax.Arrays.

  `sharding` is one sharding for every entry (e.g. NamedSharding(mesh,
  P('data'))) or a matching dict of them.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding[k], v) for k, v in batch.items()}
