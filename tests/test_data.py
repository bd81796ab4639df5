"""Tests of vqgan_jax.data: TFDS builders (no TensorFlow) and grain pipelines."""

import gzip
import logging
import os
import struct
import threading

import jax
import numpy as np
from PIL import Image
import pytest

from configs import common
from vqgan_jax.data import builders
from vqgan_jax.data import pipeline
from vqgan_jax.data import tokens

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
_HAVE_FMNIST = all(
  os.path.exists(os.path.join(FMNIST_DIR, name))
  for pair in builders.FASHION_MNIST_FILES.values()
  for name in pair
)
needs_fmnist = pytest.mark.skipif(
  not _HAVE_FMNIST,
  reason=f'Fashion-MNIST IDX files absent from {FMNIST_DIR} '
  '(apt-get install dataset-fashion-mnist)',
)


def data_config(**overrides):
  c = common.stage1_base().data
  c.update(overrides)
  return c


def write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


class ListSource:
  """In-memory random-access source; `label` = index identifies examples."""

  def __init__(self, n, shape=(20, 24, 3)):
    self._n, self._shape = n, shape

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    image = np.full(self._shape, i % 256, np.uint8)
    return {'image': image, 'label': np.int64(i)}


# ----------------------------------------------------------------------------
# Folder builder.


def _save(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)
  return path


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('folder') / 'My Pics')
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (20, 30, 3), np.uint8)
  _save(f'{root}/cats/rgb.jpg', rgb, quality=95)
  _save(f'{root}/cats/gray.png', np.full((16, 12), 77, np.uint8))
  rgba = np.zeros((10, 14, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :7, 3] = 255  # left half opaque red, right half transparent
  _save(f'{root}/cats/rgba.png', rgba)
  pal = Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE)
  os.makedirs(f'{root}/dogs')
  pal.save(f'{root}/dogs/palette.gif')
  pal.save(f'{root}/dogs/palette.png')
  Image.fromarray(np.full((9, 11), 65535, np.uint16)).save(f'{root}/dogs/deep16.png')
  _save(f'{root}/dogs/sub/nested.bmp', rgb)
  with open(f'{root}/dogs/corrupt.jpg', 'wb') as f:
    f.write(b'\xff\xd8\xff this is not a JPEG')
  png = open(f'{root}/cats/gray.png', 'rb').read()
  with open(f'{root}/dogs/truncated.png', 'wb') as f:
    f.write(png[: len(png) // 2])
  with open(f'{root}/dogs/notes.txt', 'w') as f:
    f.write('not an image, not counted')
  return root


@pytest.fixture(scope='module')
def folder_builder(image_folder, tmp_path_factory):
  cfg = data_config(
    name='folder',
    folder=image_folder,
    data_dir=str(tmp_path_factory.mktemp('tfds_folder')),
    eval_split='train',
  )
  return cfg, builders.prepare(cfg, is_chief=True)


def test_folder_builder_modes_and_corrupt_files(folder_builder):
  cfg, builder = folder_builder
  assert builders.num_skipped(builder) == 2
  assert builder.info.features['label'].names == ['cats', 'dogs']
  source = builders.get_source(cfg, 'train')
  assert len(source) == 7  # 9 image files, 2 unreadable
  shapes = {}
  for ex in source:
    image = ex['image']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    shapes.setdefault(image.shape, []).append((image, int(ex['label'])))
  gray, label = shapes[(16, 12, 3)][0]
  assert label == 0 and (gray == 77).all()
  rgba, _ = shapes[(10, 14, 3)][0]
  assert (rgba[:, :7] == [200, 0, 0]).all()  # opaque part kept
  assert (rgba[:, 7:] == 255).all()  # transparent part composited on white
  deep, label = shapes[(9, 11, 3)][0]
  assert label == 1 and (deep == 255).all()  # 16-bit max -> 8-bit max
  assert len(shapes[(20, 30, 3)]) == 4  # jpg, gif, png palette, nested bmp


def test_folder_builder_reuses_and_is_deterministic(image_folder, tmp_path):
  cfg = data_config(
    name='folder', folder=image_folder, data_dir=str(tmp_path / 'a'), eval_split='validation'
  )
  first = [ex['label'] for ex in builders.get_source(cfg, 'train')]
  first_val = builders.get_source(cfg, 'validation')
  assert len(first_val) == 1  # 5% of 9, at least one
  cfg2 = data_config(
    name='folder', folder=image_folder, data_dir=str(tmp_path / 'b'), eval_split='validation'
  )
  second = [ex['label'] for ex in builders.get_source(cfg2, 'train')]
  assert first == second
  np.testing.assert_array_equal(
    first_val[0]['image'], builders.get_source(cfg2, 'validation')[0]['image']
  )
  with pytest.raises(builders.DataError, match="available: \\['train', 'validation'\\]"):
    builders.get_source(cfg, 'test')


def test_folder_names_do_not_collide(tmp_path):
  for name in ('x', 'y'):
    _save(str(tmp_path / name / 'imgs' / 'a.png'), np.zeros((4, 4, 3), np.uint8))
  names = {builders.image_folder_config(str(tmp_path / n / 'imgs')).name for n in ('x', 'y')}
  assert len(names) == 2 and all(n.startswith('imgs_') for n in names)


def test_folder_single_class_flat(tmp_path):
  for i in range(3):
    _save(str(tmp_path / 'flat' / f'{i}.png'), np.full((5, 6), i, np.uint8))
  cfg = data_config(
    name='folder',
    folder=str(tmp_path / 'flat'),
    data_dir=str(tmp_path / 'tfds'),
    eval_split='train',
  )
  builder = builders.prepare(cfg, is_chief=True)
  assert builder.info.features['label'].names == ['flat']
  assert builders.num_skipped(builder) == 0
  assert sorted(int(ex['image'][0, 0, 0]) for ex in builders.get_source(cfg, 'train')) == [0, 1, 2]


@pytest.mark.parametrize('kind', ['missing', 'empty', 'no_images', 'unset'])
def test_folder_bad_path(tmp_path, kind):
  path = str(tmp_path / 'nowhere')
  if kind == 'empty':
    os.makedirs(path)
  elif kind == 'no_images':
    os.makedirs(path)
    open(os.path.join(path, 'readme.txt'), 'w').close()
  elif kind == 'unset':
    path = ''
  cfg = data_config(name='folder', folder=path, data_dir=str(tmp_path / 't'))
  with pytest.raises(builders.DataError, match='config.data.folder' if kind == 'unset' else path):
    builders.prepare(cfg, is_chief=True)


def test_folder_all_corrupt(tmp_path):
  os.makedirs(tmp_path / 'bad')
  (tmp_path / 'bad' / 'x.png').write_bytes(b'garbage')
  cfg = data_config(
    name='folder', folder=str(tmp_path / 'bad'), data_dir=str(tmp_path / 't'), eval_split='train'
  )
  with pytest.raises(builders.DataError, match='No readable image'):
    builders.prepare(cfg, is_chief=True)


def test_concurrent_prepare_and_waiting(image_folder, tmp_path):
  cfg = data_config(name='folder', folder=image_folder, data_dir=str(tmp_path), eval_split='train')
  with pytest.raises(builders.DataError, match='Waited'):
    builders.prepare(cfg, is_chief=False, timeout_s=0.1)
  results, errors = [], []

  def run(is_chief):
    try:
      results.append(len(builders.get_source(cfg, 'train', is_chief=is_chief)))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run, args=(c,)) for c in (True, True, False)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert not errors and results == [7, 7, 7]


def test_folder_links_visit_each_real_file_once(tmp_path, caplog):
  """A loop (cat/loop -> ..), a link back into the tree and a duplicate file
  link are skipped; a class linked from outside and a file linked from
  outside are kept. os.walk(followlinks=True) listed the loop's images over
  and over, under the wrong class."""
  root, ext = tmp_path / 'pets', tmp_path / 'elsewhere'
  for i in range(3):
    _save(str(root / 'cat' / f'c{i}.png'), np.full((4, 4), i, np.uint8))
    _save(str(root / 'dog' / f'd{i}.png'), np.full((4, 4), 10 + i, np.uint8))
    _save(str(ext / 'bird' / f'b{i}.png'), np.full((4, 4), 20 + i, np.uint8))
  _save(str(ext / 'lone.png'), np.full((4, 4), 30, np.uint8))
  os.symlink('..', root / 'cat' / 'loop')
  # The loop alone first (before, it was followed over and over; finite, unlike two loops).
  paths = builders.list_image_folder(str(root))[0]
  assert len(paths) == 6, f'{len(paths)} images listed: {paths[:8]}'
  assert builders.list_image_folder(str(root)).skipped_links == ['cat/loop']
  os.symlink('.', root / 'dog' / 'self')
  os.symlink('cat', root / 'aaa')  # sorts before cat: the real path must win
  os.symlink('../cat/c0.png', root / 'dog' / 'again.png')
  os.symlink(ext / 'bird', root / 'bird')
  os.symlink(ext / 'lone.png', root / 'dog' / 'lone.png')
  listing = builders.list_image_folder(str(root))
  assert listing.classes == ['bird', 'cat', 'dog']
  assert len(listing.paths) == 10, listing.paths
  assert sorted(listing.skipped_links) == ['aaa', 'cat/loop', 'dog/again.png', 'dog/self']
  assert all(p.split('/')[0] in ('bird', 'cat', 'dog') for p in listing.paths)
  cfg = data_config(
    name='folder', folder=str(root), data_dir=str(tmp_path / 'tfds'), eval_split='train'
  )
  with caplog.at_level(logging.WARNING):
    builder = builders.prepare(cfg, is_chief=True)
  assert 'Skipped 4 symbolic link(s)' in caplog.text
  assert builders.num_links_skipped(builder) == 4
  by_label = {}
  for ex in builders.get_source(cfg, 'train'):
    by_label.setdefault(int(ex['label']), []).append(int(ex['image'][0, 0, 0]))
  assert {k: sorted(v) for k, v in by_label.items()} == {
    0: [20, 21, 22],
    1: [0, 1, 2],
    2: [10, 11, 12, 30],
  }


def test_folder_changed_since_prepared_is_prepared_again(tmp_path, caplog):
  folder = tmp_path / 'flat'
  for i in range(3):
    _save(str(folder / f'{i}.png'), np.full((5, 6), i, np.uint8))
  cfg = data_config(
    name='folder', folder=str(folder), data_dir=str(tmp_path / 'tfds'), eval_split='train'
  )
  assert len(builders.get_source(cfg, 'train')) == 3
  _save(str(folder / '3.png'), np.full((5, 6), 3, np.uint8))
  with caplog.at_level(logging.WARNING):
    source = builders.get_source(cfg, 'train')
  assert len(source) == 4
  assert '3 image files then, 4 now' in caplog.text
  assert 'preparing it again' in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # unchanged: reused, nothing said
    assert len(builders.get_source(cfg, 'train')) == 4
  assert 'again' not in caplog.text
  # A changed image (same name, new size) is a change too.
  _save(str(folder / '0.png'), np.full((7, 6), 0, np.uint8))
  assert {ex['image'].shape[0] for ex in builders.get_source(cfg, 'train')} == {5, 7}
  os.remove(folder / '1.png')
  assert len(builders.get_source(cfg, 'train')) == 3
  # A non-chief process waits for the fresh dataset rather than reading the stale one.
  _save(str(folder / '9.png'), np.full((5, 6), 9, np.uint8))
  with pytest.raises(builders.DataError, match='Waited'):
    builders.prepare(cfg, is_chief=False, timeout_s=0.1)
  # A source folder that is gone leaves the prepared copy readable.
  builders.prepare(cfg, is_chief=True)
  for name in os.listdir(folder):
    os.remove(folder / name)
  os.rmdir(folder)
  with caplog.at_level(logging.WARNING):
    assert len(builders.get_source(cfg, 'train')) == 4
  assert 'is gone' in caplog.text


def test_check_splits_folder(image_folder, tmp_path):
  cfg = data_config(name='folder', folder=image_folder, data_dir=str(tmp_path), eval_split='test')
  with pytest.raises(
    builders.DataError,
    match="config.data.eval_split='test'.*no split 'test'; "
    r"available: \['train'\]",
  ):
    pipeline.check_splits(cfg)
  builder = pipeline.check_splits(cfg, ('train_split',))  # a run without eval
  assert sorted(builder.info.splits.keys()) == ['train']
  cfg = data_config(
    name='folder',
    folder=image_folder,
    data_dir=str(tmp_path),
    eval_split='validation',
    validation_fraction=0.0,
  )
  with pytest.raises(builders.DataError, match='validation_fraction'):
    pipeline.check_splits(cfg)
  cfg.validation_fraction = 0.2
  pipeline.check_splits(cfg)
  cfg.train_split = 'train[abc]'
  with pytest.raises(builders.DataError, match="config.data.train_split='train\\[abc\\]'"):
    pipeline.check_splits(cfg)


@needs_fmnist
def test_check_splits_fashion_mnist(fmnist):
  pipeline.check_splits(fmnist)
  cfg = data_config(**dict(fmnist, eval_split='validation'))
  with pytest.raises(
    builders.DataError,
    match="config.data.eval_split='validation'.*"
    r"available: \['test', 'train'\]",
  ):
    pipeline.check_splits(cfg)
  cfg = data_config(**dict(fmnist, train_split='train[:10%]+test'))
  pipeline.check_splits(cfg)


def test_check_splits_codes(tmp_path):
  def examples(split):
    del split
    yield {
      'codes': np.zeros((2, 4), np.int32),
      'label': np.zeros(2, np.int32),
      'index': np.arange(2),
    }

  tokens.write_codes(
    str(tmp_path), 'tiny', splits=['train'], examples=examples, seq_len=4, n_embed=16
  )
  builder = tokens.open_codes(str(tmp_path), 'tiny')
  tokens.check_splits(builder, data_config(eval_split='train[:1]'))
  with pytest.raises(
    builders.DataError,
    match="config.data.eval_split='validation'.*"
    r"available: \['train'\].*--mode=encode",
  ):
    tokens.check_splits(builder, data_config())


# ----------------------------------------------------------------------------
# Fashion-MNIST and other names.


@pytest.fixture(scope='module')
def fmnist(tmp_path_factory):
  """Real test split (10k) and the first 2000 real train images.

  Preparing all 70k takes ~13 s on 2 cores; 12k keep the suite fast.
  """
  if not _HAVE_FMNIST:
    pytest.skip(f'Fashion-MNIST IDX files absent from {FMNIST_DIR}')
  src = tmp_path_factory.mktemp('fmnist_src')
  for name in builders.FASHION_MNIST_FILES['test']:
    os.symlink(os.path.join(FMNIST_DIR, name), src / name)
  images, labels = builders.load_fashion_mnist(FMNIST_DIR, 'train')
  image_file, label_file = builders.FASHION_MNIST_FILES['train']
  write_idx(src / image_file, images[:2000])
  write_idx(src / label_file, labels[:2000])
  cfg = data_config(
    name='fashion_mnist',
    source_dir=str(src),
    data_dir=str(tmp_path_factory.mktemp('tfds_fm')),
    image_size=32,
    eval_split='test',
    random_crop=False,
  )
  builders.prepare(cfg, is_chief=True)
  return cfg


@needs_fmnist
def test_fashion_mnist_real_files(fmnist):
  source = builders.get_source(fmnist, 'test')
  assert len(source) == 10000
  assert len(builders.get_source(fmnist, 'train')) == 2000
  images, labels = builders.load_fashion_mnist(FMNIST_DIR, 'test')
  for i in (0, 1, 4321, 9999):  # IDX order is kept
    ex = source[i]
    assert ex['image'].shape == (28, 28, 1) and ex['image'].dtype == np.uint8
    np.testing.assert_array_equal(ex['image'][..., 0], images[i])
    assert ex['label'] == labels[i]
  assert set(np.unique(labels)) == set(range(10))
  builder = builders.prepare(fmnist)
  assert builder.info.features['label'].names[9] == 'Ankle boot'


def test_fashion_mnist_missing_dir(tmp_path):
  cfg = data_config(
    name='fashion_mnist', source_dir=str(tmp_path / 'none'), data_dir=str(tmp_path / 't')
  )
  with pytest.raises(builders.DataError, match='apt-get install dataset-fashion-mnist'):
    builders.prepare(cfg, is_chief=True)


def test_fashion_mnist_missing_and_malformed_file(tmp_path):
  src = tmp_path / 'src'
  os.makedirs(src)
  for split in ('train', 'test'):
    image_file, label_file = builders.FASHION_MNIST_FILES[split]
    write_idx(src / image_file, np.zeros((3, 28, 28), np.uint8))
    write_idx(src / label_file, np.zeros((3,), np.uint8))
  cfg = data_config(name='fashion_mnist', source_dir=str(src), data_dir=str(tmp_path / 't'))
  bad = src / 't10k-labels-idx1-ubyte.gz'
  bad.write_bytes(gzip.compress(b'\x00\x00\x08\x03garbage'))
  with pytest.raises(builders.DataError, match=f'Malformed IDX file {bad}'):
    builders.prepare(cfg, is_chief=True)
  bad.write_bytes(b'\x1f\x8b truncated gzip')
  with pytest.raises(builders.DataError, match=str(bad)):
    builders.read_idx(str(bad), 1)
  bad.unlink()
  with pytest.raises(builders.DataError, match=f'{bad} is missing'):
    builders.prepare(cfg, is_chief=True)
  assert not os.path.exists(tmp_path / 't' / 'fashion_mnist_idx' / '1.0.0')


def test_unknown_dataset_name(tmp_path):
  cfg = data_config(name='no_such_dataset_xyz', data_dir=str(tmp_path))
  with pytest.raises(builders.DataError, match="config.data.name='no_such_dataset_xyz'"):
    builders.get_source(cfg, 'train')


def test_unprepared_tfds_dataset(tmp_path):
  cfg = data_config(name='mnist', data_dir=str(tmp_path))
  with pytest.raises(builders.DataError, match=f'not prepared in {tmp_path}'):
    builders.prepare(cfg)


# ----------------------------------------------------------------------------
# Preprocessing.


def test_center_and_random_crop():
  image = np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) % 256
  image = image.astype(np.uint8)
  out = pipeline.preprocess(image, 32)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  assert (out[..., 0] == out[..., 2]).all()  # gray repeated
  seen = set()
  for seed in range(8):
    crop = pipeline.preprocess(image, 32, np.random.default_rng(seed))
    assert crop.shape == (32, 32, 3)
    again = pipeline.preprocess(image, 32, np.random.default_rng(seed))
    np.testing.assert_array_equal(crop, again)
    seen.add(crop.tobytes())
  assert len(seen) > 1
  rgba = np.zeros((28, 28, 4), np.uint8)
  assert (pipeline.preprocess(rgba, 32) == 255).all()  # transparent -> white


# ----------------------------------------------------------------------------
# Iterators.


def _take(it, n):
  return [next(it) for _ in range(n)]


def _labels(batches):
  return np.concatenate([b['label'] for b in batches])


def test_train_iterator_deterministic_and_reshuffled():
  cfg = data_config(image_size=16, random_crop=True)
  src = ListSource(40)
  make = lambda seed: pipeline.make_train_iterator(
    cfg, 8, seed, process_index=0, process_count=1, source=src
  )
  a, b, c = _take(make(0), 10), _take(make(0), 10), _take(make(1), 10)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert a[0]['image'].shape == (8, 16, 16, 3)
  assert a[0]['image'].dtype == np.uint8 and a[0]['label'].dtype == np.int32
  assert not np.array_equal(_labels(a), _labels(c))
  epochs = _labels(a).reshape(2, 40)
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_train_iterator_resume():
  cfg = data_config(image_size=16, random_crop=True)
  src = ListSource(30, shape=(24, 20, 3))
  make = lambda: pipeline.make_train_iterator(
    cfg, 4, 3, process_index=0, process_count=1, source=src
  )
  it = make()
  _take(it, 5)
  state = it.get_state()
  assert isinstance(state, str)
  expected = _take(it, 12)  # crosses an epoch boundary
  resumed = make()
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 12)):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_train_iterator_process_shards():
  cfg = data_config(image_size=8)
  src = ListSource(48, shape=(8, 8, 3))
  shards = []
  for p in range(2):
    it = pipeline.make_train_iterator(cfg, 8, 0, process_index=p, process_count=2, source=src)
    batches = _take(it, 6)  # one epoch of the 24-example shard
    assert all(b['image'].shape[0] == 4 for b in batches)
    shards.append(set(_labels(batches)))
    assert len(shards[-1]) == 24
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(48))


def test_train_iterator_global_batches_do_not_depend_on_process_count():
  # Process p loads its slice of every global batch: concatenated in process order, the
  # local batches of 2 or 3 processes are the global batches of 1, random crops included.
  cfg = data_config(image_size=16, random_crop=True)
  src = ListSource(30, shape=(24, 20, 3))
  single = _take(
    pipeline.make_train_iterator(cfg, 6, 5, process_index=0, process_count=1, source=src), 12
  )  # crosses 2 epochs
  for count in (2, 3):
    parts = [
      _take(
        pipeline.make_train_iterator(cfg, 6, 5, process_index=p, process_count=count, source=src),
        12,
      )
      for p in range(count)
    ]
    for n, expected in enumerate(single):
      for key in ('image', 'label'):
        np.testing.assert_array_equal(
          np.concatenate([parts[p][n][key] for p in range(count)]), expected[key]
        )


def test_indivisible_batch():
  cfg = data_config(image_size=8)
  with pytest.raises(builders.DataError, match='train.batch_size=9'):
    pipeline.make_train_iterator(cfg, 9, 0, process_index=0, process_count=2, source=ListSource(40))
  with pytest.raises(builders.DataError, match='train.eval_batch_size=5'):
    pipeline.make_eval_iterator(cfg, 5, process_index=1, process_count=2, source=ListSource(40))


@pytest.mark.parametrize('limit,expected', [(-1, 23), (10, 10)])
def test_eval_iterator_covers_once_with_mask(limit, expected):
  cfg = data_config(image_size=8, eval_examples=limit)
  src = ListSource(23, shape=(10, 12, 3))
  assert pipeline.num_eval_examples(cfg, source=src) == expected
  per_process = []
  for p in range(2):
    batches = list(
      pipeline.make_eval_iterator(cfg, 8, process_index=p, process_count=2, source=src)
    )
    per_process.append(batches)
    assert len(batches) == -(-expected // 8)  # same count on every process
    for b in batches:
      assert b['image'].shape == (4, 8, 8, 3) and b['mask'].dtype == bool
      assert (b['image'][~b['mask']] == 0).all()
  # Assemble global batches as to_global would: process 0's rows, then 1's.
  labels = np.concatenate(
    [np.concatenate([b0['label'], b1['label']]) for b0, b1 in zip(*per_process)]
  )
  mask = np.concatenate([np.concatenate([b0['mask'], b1['mask']]) for b0, b1 in zip(*per_process)])
  np.testing.assert_array_equal(labels[mask], np.arange(expected))
  assert not mask[expected:].any()


@needs_fmnist
def test_fashion_mnist_iterators(fmnist):
  it = pipeline.make_train_iterator(fmnist, 16, 0, process_index=0, process_count=1)
  batch = next(it)
  assert batch['image'].shape == (16, 32, 32, 3)
  assert batch['label'].min() >= 0 and batch['label'].max() < 10
  cfg = data_config(**{**fmnist.to_dict(), 'eval_examples': 100})
  batches = list(pipeline.make_eval_iterator(cfg, 64, process_index=0, process_count=1))
  assert len(batches) == 2 and sum(b['mask'].sum() for b in batches) == 100


@needs_fmnist
def test_in_memory_source_and_iterators_equal_the_tfds_ones(fmnist):
  """in_memory reads Fashion-MNIST's IDX files (and a sliced split by decoding the TFDS
  source in chunks): the same records, so the same batches as reading TFDS record by record."""
  mem = data_config(**{**fmnist.to_dict(), 'in_memory': True, 'read_threads': 0})
  for split, every in (('train', 1), ('test', 7), ('test[10:2500]', 3)):
    disk, memory = builders.get_source(fmnist, split), builders.get_source(mem, split)
    assert isinstance(memory, builders.MemorySource) and len(memory) == len(disk)
    for i in range(0, len(disk), every):
      a, b = disk[i], memory[i]
      np.testing.assert_array_equal(a['image'], b['image'])
      assert a['label'] == b['label'] and b['image'].dtype == np.uint8
  train = [
    pipeline.make_train_iterator(c, 16, 3, process_index=0, process_count=1) for c in (fmnist, mem)
  ]
  for _ in range(3):
    a, b = (next(it) for it in train)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  evals = [
    list(pipeline.make_eval_iterator(data_config(**{**c.to_dict(), 'eval_examples': 300}), 128))
    for c in (fmnist, mem)
  ]
  assert len(evals[0]) == len(evals[1]) == 3
  for a, b in zip(*evals):
    for k in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(a[k], b[k])


def test_in_memory_folder_of_mixed_sizes_equals_the_tfds_source(folder_builder):
  cfg, _ = folder_builder
  disk = builders.get_source(cfg, 'train')
  memory = builders.get_source(data_config(**{**cfg.to_dict(), 'in_memory': True}), 'train')
  assert isinstance(memory, builders.MemorySource) and len(memory) == len(disk) > 1
  shapes = set()
  for i in range(len(disk)):
    np.testing.assert_array_equal(memory[i]['image'], disk[i]['image'])
    assert memory[i]['label'] == disk[i]['label']
    shapes.add(memory[i]['image'].shape)
  assert len(shapes) > 1  # the folder's images differ in size: kept as a list


def test_to_global():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  batch = next(
    pipeline.make_eval_iterator(
      data_config(image_size=8), 4, process_index=0, process_count=1, source=ListSource(6)
    )
  )
  out = pipeline.to_global(batch, sharding)
  assert set(out) == {'image', 'label', 'mask'}
  assert isinstance(out['image'], jax.Array) and out['image'].shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(np.asarray(out['label']), batch['label'])
