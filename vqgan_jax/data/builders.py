"""TFDS datasets for training: Fashion-MNIST from IDX files, image folders, or
any prepared TFDS dataset.

Everything is written as `array_record` with PNG-encoded images so that
preparing and reading works without TensorFlow (TFDS then encodes and decodes
with PIL; numpy images, `tfds.load` and tfrecord would need TF).
"""

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import time
from typing import NamedTuple
import warnings

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds


class DataError(ValueError):
  """A dataset cannot be found, prepared or read; the message says why."""


def default_data_dir():
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def _data_dir(data_config):
  return os.path.abspath(os.path.expanduser(data_config.data_dir or default_data_dir()))


# ----------------------------------------------------------------------------
# Fashion-MNIST from IDX files.

FASHION_MNIST_CLASSES = (
  'T-shirt/top',
  'Trouser',
  'Pullover',
  'Dress',
  'Coat',
  'Sandal',
  'Shirt',
  'Sneaker',
  'Bag',
  'Ankle boot',
)

FASHION_MNIST_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}

_FASHION_MNIST_HOWTO = (
  'Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; '
  'files land in /usr/share/datasets/fashion-mnist), or download the 4 IDX '
  'files ({files}) from '
  'https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a '
  'directory DIR and pass --config.data.source_dir=DIR.'
).format(files=', '.join(f for pair in FASHION_MNIST_FILES.values() for f in pair))


def _find_idx_file(source_dir, name):
  """`name` (.gz) or, as some mirrors ship them, its uncompressed twin."""
  path = os.path.join(source_dir, name)
  if os.path.exists(path):
    return path
  plain = path[: -len('.gz')]
  if os.path.exists(plain):
    return plain
  raise DataError(f'Fashion-MNIST file {path} is missing. {_FASHION_MNIST_HOWTO}')


def read_idx(path, ndim):
  """Reads an IDX file of uint8 (optionally gzipped) into a numpy array."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    if raw[:2] == b'\x1f\x8b':
      raw = gzip.decompress(raw)
  except (OSError, EOFError) as e:
    raise DataError(f'Cannot read IDX file {path}: {e}') from e
  # Header: 2 zero bytes, dtype code (0x08 = uint8), ndim, ndim big-endian
  # uint32 sizes, then the row-major payload.
  head = 4 + 4 * ndim
  if len(raw) < head or raw[:2] != b'\0\0' or raw[2] != 0x08 or raw[3] != ndim:
    raise DataError(
      f'Malformed IDX file {path}: expected a uint8 IDX header with {ndim} '
      f'dimension(s), got bytes {raw[:4].hex() or "(empty)"}.'
    )
  dims = tuple(int(d) for d in np.frombuffer(raw[4:head], dtype='>u4'))
  size = int(np.prod(dims))
  if len(raw) - head != size:
    raise DataError(
      f'Malformed IDX file {path}: header says shape {dims} '
      f'({size} bytes) but the payload has {len(raw) - head} bytes.'
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def check_fashion_mnist_dir(source_dir):
  if not source_dir or not os.path.isdir(source_dir):
    raise DataError(
      f'Fashion-MNIST source directory {source_dir!r} does not exist. {_FASHION_MNIST_HOWTO}'
    )
  for pair in FASHION_MNIST_FILES.values():
    for name in pair:
      _find_idx_file(source_dir, name)


def load_fashion_mnist(source_dir, split):
  """Returns (images uint8 [N, 28, 28], labels uint8 [N]) of one split."""
  check_fashion_mnist_dir(source_dir)
  image_file, label_file = (_find_idx_file(source_dir, n) for n in FASHION_MNIST_FILES[split])
  images = read_idx(image_file, ndim=3)
  labels = read_idx(label_file, ndim=1)
  if images.shape[1:] != (28, 28):
    raise DataError(
      f'Malformed IDX file {image_file}: images are {images.shape[1:]}, expected (28, 28).'
    )
  if len(images) != len(labels):
    raise DataError(
      f'{image_file} has {len(images)} images but {label_file} has {len(labels)} labels.'
    )
  if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
    raise DataError(
      f'Malformed IDX file {label_file}: label {labels.max()} '
      f'outside [0, {len(FASHION_MNIST_CLASSES)}).'
    )
  return images, labels


def _png(array_or_image):
  image = (
    array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  )
  buf = io.BytesIO()
  image.save(buf, format='PNG')
  return buf.getvalue()


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (60k train, 10k test) from the 4 IDX files in manual_dir.

  Records keep the IDX order: record i of a split is IDX record i.
  """

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = _FASHION_MNIST_HOWTO

  def __init__(self, *, file_format='array_record', **kwargs):
    # array_record: the only format TFDS writes and reads without TensorFlow.
    super().__init__(file_format=file_format, **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description='Fashion-MNIST read from its IDX files.',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(28, 28, 1), encoding_format='png'),
          'label': tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://github.com/zalandoresearch/fashion-mnist',
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    source_dir = os.fspath(dl_manager.manual_dir)
    # Fail on a missing or malformed file before TFDS writes anything.
    check_fashion_mnist_dir(source_dir)
    return {split: self._generate_examples(source_dir, split) for split in FASHION_MNIST_FILES}

  def _generate_examples(self, source_dir, split):
    images, labels = load_fashion_mnist(source_dir, split)
    for i, (image, label) in enumerate(zip(images, labels)):
      # PNG bytes, not numpy: TFDS encodes numpy images with TensorFlow.
      yield i, {'image': _png(image), 'label': int(label)}


# ----------------------------------------------------------------------------
# A folder of images.

IMAGE_EXTENSIONS = (
  '.jpg',
  '.jpeg',
  '.png',
  '.bmp',
  '.webp',
  '.gif',
  '.tif',
  '.tiff',
  '.ppm',
  '.pgm',
  '.pbm',
  '.pnm',
  '.jfif',
)

# Decoding failures PIL reports for corrupt, truncated or unsupported files.
_DECODE_ERRORS = (
  OSError,
  ValueError,
  SyntaxError,
  EOFError,
  TypeError,
  Image.DecompressionBombError,
)


class FolderListing(NamedTuple):
  """The images of a folder, each real file once (see `list_image_folder`)."""

  paths: list  # sorted relative paths
  classes: list  # class names
  labels: list  # label per path
  skipped_links: list  # relative paths of links skipped (loops, already listed targets)
  fingerprint: str  # hash of (path, size, mtime) of every listed file


def _is_image_name(name):
  return not name.startswith('.') and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _identity(path):
  st = os.stat(path)
  return st.st_dev, st.st_ino


def _walk_images(folder):
  """(relative image paths, skipped links) under `folder`, visiting every real file and
  folder once.

  Linked folders are followed (a class may live elsewhere) unless they lead to a folder
  already visited: a loop (`cat/loop -> ..`) or a second way into the same images would
  list files many times, under the wrong class, on both sides of the validation split.
  The real tree is walked first, so an image reachable both directly and through a link
  keeps its direct path; among links, the first in sorted order wins.
  """
  seen_dirs, seen_files = set(), set()
  found, links, skipped = [], [], []

  def walk(top, rel_top):
    for root, dirs, files in os.walk(top):
      rel_root = os.path.normpath(os.path.join(rel_top, os.path.relpath(root, top)))
      kept = []
      for d in sorted(d for d in dirs if not d.startswith('.')):
        if os.path.islink(os.path.join(root, d)):
          links.append((os.path.join(root, d), os.path.normpath(os.path.join(rel_root, d))))
          continue
        identity = _identity(os.path.join(root, d))
        if identity not in seen_dirs:  # the same folder again (e.g. a bind mount)
          seen_dirs.add(identity)
          kept.append(d)
      dirs[:] = kept
      for name in sorted(files):
        if _is_image_name(name):
          full = os.path.join(root, name)
          found.append((os.path.islink(full), os.path.normpath(os.path.join(rel_root, name)), full))

  seen_dirs.add(_identity(folder))
  walk(folder, '')
  while links:  # breadth first over linked folders, sorted, so the result is deterministic
    links.sort(key=lambda link: link[1])
    path, rel = links.pop(0)
    try:
      identity = _identity(path)
    except OSError:  # a broken link
      skipped.append(rel)
      continue
    if identity in seen_dirs or not os.path.isdir(path):
      skipped.append(rel)
      continue
    seen_dirs.add(identity)
    walk(path, rel)
  paths = []
  for _, rel, full in sorted(found):  # real files first (is_link False), then links
    try:
      identity = _identity(full)
    except OSError:
      identity = ('broken', rel)  # listed; it fails to decode and is reported as unreadable
    if identity in seen_files:
      skipped.append(rel)
      continue
    seen_files.add(identity)
    paths.append(rel)
  return sorted(paths), sorted(skipped)


def _fingerprint(folder, paths):
  digest = hashlib.sha256()
  for path in paths:
    try:
      st = os.stat(os.path.join(folder, path))
      entry = f'{path}\0{st.st_size}\0{st.st_mtime_ns}\n'
    except OSError:
      entry = f'{path}\0missing\n'
    digest.update(entry.encode('utf-8', 'surrogateescape'))
  return digest.hexdigest()


def list_image_folder(folder, field='config.data.folder'):
  """Lists a folder's images as a `FolderListing`.

  Classes are the immediate subfolders when every image lies in one;
  otherwise the folder is one class named after itself. Hidden files and
  folders (e.g. macOS `._x.jpg` resource forks) are ignored. Symbolic links
  are followed, but every real file and folder is listed once: links that
  loop or lead to something already listed are skipped (`skipped_links`).
  `field`: the config field that named the folder, for the errors.
  """
  if not folder or not os.path.isdir(folder):
    raise DataError(f'Image folder {folder!r} does not exist or is not a directory ({field}).')
  paths, skipped = _walk_images(folder)
  if not paths:
    raise DataError(
      f'Image folder {folder!r} ({field}) contains no image files ({", ".join(IMAGE_EXTENSIONS)}).'
    )
  if all(os.sep in p for p in paths):
    classes = sorted({p.split(os.sep, 1)[0] for p in paths})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p.split(os.sep, 1)[0]] for p in paths]
  else:
    classes = [os.path.basename(os.path.normpath(folder)) or 'images']
    labels = [0] * len(paths)
  return FolderListing(paths, classes, labels, skipped, _fingerprint(folder, paths))


def _alpha_on_white(image):
  """Composites an image with alpha onto white: transparent pixels carry no
  meaningful colour (often black), and white is how viewers show them."""
  image = image.convert('RGBA')
  background = Image.new('RGBA', image.size, (255, 255, 255, 255))
  return Image.alpha_composite(background, image).convert('RGB')


def pil_to_rgb(image):
  """Any PIL image (any mode, EXIF-rotated) -> an upright RGB uint8 PIL image; alpha is
  composited onto white, 16-bit and float images are rescaled to 8 bits."""
  image = ImageOps.exif_transpose(image)  # camera photos stored rotated
  mode = image.mode
  if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
    mode in ('P', 'L', 'RGB') and 'transparency' in image.info
  ):
    return _alpha_on_white(image)
  if mode.startswith('I') or mode == 'F':
    # 16-bit (I;16*, or I from older Pillow) and float: PIL's convert clips
    # instead of rescaling, so rescale to 8 bits here.
    x = np.asarray(image).astype(np.float64)
    if mode.startswith('I;16') or (mode == 'I' and x.max(initial=0) > 255):
      x = x / 257.0
    elif mode == 'F' and x.max(initial=0) <= 1.0:
      x = x * 255.0
    gray = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
  return image.convert('RGB')  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def load_rgb(path):
  """Decodes an image file fully (so truncation shows) as RGB uint8 [H,W,3]."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # EXIF/palette chatter on odd files
    with Image.open(path) as image:
      image.load()
      rgb = pil_to_rgb(image)
  array = np.asarray(rgb, dtype=np.uint8)
  if array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
    raise ValueError(f'decoded to shape {array.shape}')
  return array


def load_rgb_or_skip(path, skipped):
  """`load_rgb(path)`, or None for a file that does not decode (corrupt, truncated,
  unsupported): its path is appended to `skipped` and logged. How every folder reader
  treats unreadable files: skipped and counted, not fatal."""
  try:
    return load_rgb(path)
  except _DECODE_ERRORS as e:
    skipped.append(path)
    logging.warning('Skipping unreadable image %s: %s', path, e)
    return None


def _split_key(path):
  return hashlib.sha1(path.encode('utf-8')).hexdigest()


def validation_count(num_files, fraction):
  if not fraction or num_files < 2:
    return 0
  return min(num_files - 1, max(1, int(round(fraction * num_files))))


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  folder: str = ''
  validation_fraction: float = 0.0
  classes: tuple[str, ...] = ()  # filled by `prepare` from the listing


def image_folder_config(folder, validation_fraction=0.0):
  """A config whose name is unique per (absolute folder, fraction)."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not 0.0 <= validation_fraction < 1.0:
    raise DataError(f'validation_fraction must be in [0, 1), got {validation_fraction}.')
  base = re.sub(r'[^a-z0-9]+', '_', os.path.basename(folder).lower())
  digest = hashlib.sha1(f'{folder}\0{validation_fraction!r}'.encode('utf-8')).hexdigest()[:10]
  return ImageFolderConfig(
    name=f'{base.strip("_") or "root"}_{digest}',
    folder=folder,
    validation_fraction=float(validation_fraction),
    description=f'Images under {folder}',
  )


class ImageFolderArray(tfds.core.GeneratorBasedBuilder):
  """A folder of images as `train` (+ optional `validation`) splits.

  Build with `config=image_folder_config(folder, fraction)`. Images are
  decoded with PIL, turned into RGB uint8 (see `pil_to_rgb`) and stored as PNG
  (lossless, so JPEG sources grow on disk). Unreadable files are skipped;
  their number and names are logged and kept in the dataset's
  `metadata.json` (`info.metadata['num_skipped']`, `['skipped']`), as are
  the links skipped by the listing (`['num_links_skipped']`) and the
  listing's fingerprint, which tells `prepare` when the folder has changed.
  Record order is TFDS's deterministic key-hash shuffle of the file list.
  """

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, file_format='array_record', listing=None, **kwargs):
    # The listing whose fingerprint is stored: the files written, even if the
    # folder changes while they are.
    self._listing = listing
    # array_record: the only format TFDS writes and reads without TensorFlow.
    super().__init__(file_format=file_format, **kwargs)

  def _folder_listing(self):
    if self._listing is None:
      self._listing = list_image_folder(self.builder_config.folder)
    return self._listing

  def _info(self):
    classes = self.builder_config.classes or self._folder_listing().classes
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'Images from {self.builder_config.folder}.',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
          'label': tfds.features.ClassLabel(names=classes),
        }
      ),
      supervised_keys=('image', 'label'),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    listing = self._folder_listing()
    paths, labels = listing.paths, listing.labels
    self._skipped = []
    # Held out: the first readable files in a fixed hash order, so the split
    # depends neither on listing order nor on corrupt files. Only these are
    # decoded twice (here and when written).
    held_out = []
    for path in sorted(paths, key=_split_key):
      if len(held_out) == validation_count(len(paths), cfg.validation_fraction):
        break
      if self._load(path) is not None:
        held_out.append(path)
    excluded = set(held_out) | set(self._skipped)
    splits = {'train': [(p, y) for p, y in zip(paths, labels) if p not in excluded]}
    if held_out:
      label_of = dict(zip(paths, labels))
      splits['validation'] = [(p, label_of[p]) for p in sorted(held_out)]
    return {split: self._generate_examples(split, items) for split, items in splits.items()}

  def _load(self, path):
    failed = []
    image = load_rgb_or_skip(os.path.join(self.builder_config.folder, path), failed)
    if failed:
      self._skipped.append(path)  # relative, as the metadata lists them
    return image

  def _generate_examples(self, split, items):
    count = 0
    for path, label in items:
      image = self._load(path)
      if image is not None:
        count += 1
        yield path, {'image': _png(image), 'label': label}
    if not count:
      raise DataError(
        f'No readable image for split {split!r} in '
        f'{self.builder_config.folder!r}: {len(self._skipped)} of the image '
        'files failed to decode.'
      )

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config=download_config)
    # Written with dataset_info into the not-yet-renamed directory, so readers
    # never see a dataset without it.
    skipped = sorted(self._skipped)
    listing = self._folder_listing()
    self.info.metadata.update(
      num_skipped=len(skipped),
      skipped=skipped,
      num_links_skipped=len(listing.skipped_links),
      links_skipped=listing.skipped_links[:1000],
      num_files=len(listing.paths),
      fingerprint=listing.fingerprint,
    )
    if skipped:
      logging.warning(
        'Skipped %d unreadable image file(s) in %s: %s',
        len(skipped),
        self.builder_config.folder,
        ', '.join(skipped[:50]),
      )
    if listing.skipped_links:
      logging.warning(
        'Skipped %d symbolic link(s) in %s that loop or lead to images or '
        'folders already listed (each real file is read once): %s',
        len(listing.skipped_links),
        self.builder_config.folder,
        ', '.join(listing.skipped_links[:50]),
      )


def _metadata(data_path):
  path = os.path.join(os.fspath(data_path), 'metadata.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def num_skipped(builder):
  """Unreadable files skipped when a folder dataset was built (else 0)."""
  return int(_metadata(builder.data_path).get('num_skipped', 0))


def num_links_skipped(builder):
  """Symbolic links a folder dataset's listing skipped (loops, duplicates)."""
  return int(_metadata(builder.data_path).get('num_links_skipped', 0))


# ----------------------------------------------------------------------------
# Preparing and opening.


def _is_chief(is_chief):
  if is_chief is not None:
    return is_chief
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index() == 0


@contextlib.contextmanager
def _file_lock(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _is_prepared(data_path):
  # TFDS renames a complete temporary dir into place, info file included.
  return os.path.exists(os.path.join(data_path, 'dataset_info.json'))


def _discard(data_path):
  # Renamed away first, so no reader sees a half-deleted dataset.
  aside = f'{data_path}.stale-{os.getpid()}-{time.time_ns()}'
  os.rename(data_path, aside)
  shutil.rmtree(aside, ignore_errors=True)


def _prepare_once(
  make_builder, data_path, download_config, is_chief, timeout_s, poll_s=1.0, stale=None
):
  """Prepares a dataset once per data_dir, however many processes race for it.

  The chief prepares under a file lock (TFDS writes into a temporary dir and
  renames it, so readers never see half a dataset); the others only wait for
  `data_path` to appear, and need no source files. On hosts without a shared
  data_dir pass is_chief=True on every host: each prepares its own copy, and
  a lost rename race is harmless. `stale(data_path)`, if given, returns why a
  prepared dataset no longer matches its source (or None): the chief then
  prepares it again, the others wait for the fresh one.
  """

  def ready():
    return _is_prepared(data_path) and not (stale and stale(data_path))

  if not ready() and is_chief:
    parent, version = os.path.split(data_path)
    with _file_lock(os.path.join(parent, f'.{version}.lock')):
      reason = _is_prepared(data_path) and stale and stale(data_path)
      if reason:
        logging.warning('%s: preparing it again.', reason)
        _discard(data_path)
      if not _is_prepared(data_path):  # else another process just did it
        builder = make_builder()
        start = time.time()
        try:
          builder.download_and_prepare(download_config=download_config)
        except OSError:
          # The final rename lost against a host whose lock we cannot see.
          if not _is_prepared(data_path):
            raise
        logging.info('Prepared %s in %.1f s.', data_path, time.time() - start)
  deadline = time.time() + timeout_s
  while not ready():
    left = deadline - time.time()
    if left <= 0:
      raise DataError(
        f'Waited {timeout_s:.0f} s for process 0 to prepare {data_path}. '
        'If data_dir is not shared between hosts, prepare on every host '
        '(is_chief=True).'
      )
    time.sleep(min(poll_s, left))
  return make_builder()


def folder_validation_fraction(data_config):
  """Held-out fraction for a folder: only when eval reads a `validation` split
  (otherwise the held-out images would be used by nothing); then
  `data.validation_fraction`, 5% by default."""
  if data_config.eval_split != 'validation':
    return 0.0
  return float(data_config.get('validation_fraction', 0.05))


def prepare(data_config, *, is_chief=None, timeout_s=3600.0):
  """Returns a prepared TFDS builder for `config.data` (preparing if needed).

  'fashion_mnist': our IDX builder over `source_dir` (dataset
  `fashion_mnist_idx` in data_dir). 'folder': `ImageFolderArray` over
  `folder` (dataset `image_folder_array/<folder name>_<hash>`). Anything else:
  an already-prepared TFDS dataset `name` in data_dir (array_record).
  Only the chief (default: jax process 0) prepares; others wait.
  """
  name = data_config.name
  data_dir = _data_dir(data_config)
  if name == 'fashion_mnist':
    source_dir = os.path.expanduser(data_config.source_dir or '')
    path = os.path.join(data_dir, FashionMnistIdx.name, str(FashionMnistIdx.VERSION))
    is_chief = _is_chief(is_chief)
    if is_chief and not _is_prepared(path):
      check_fashion_mnist_dir(source_dir)  # before TFDS's own, vaguer checks
    return _prepare_once(
      lambda: FashionMnistIdx(data_dir=data_dir),
      path,
      tfds.download.DownloadConfig(manual_dir=source_dir),
      is_chief,
      timeout_s,
    )
  if name == 'folder':
    if not data_config.folder:
      raise DataError("config.data.name='folder' needs config.data.folder (a directory of images).")
    config = image_folder_config(data_config.folder, folder_validation_fraction(data_config))
    path = os.path.join(data_dir, ImageFolderArray.name, config.name, str(ImageFolderArray.VERSION))
    if os.path.isdir(config.folder) or not _is_prepared(path):
      listing = list_image_folder(config.folder)
    else:
      # A prepared dataset outlives its source (e.g. data_dir copied to
      # another host): there is nothing to compare it with.
      logging.warning(
        'Image folder %s is gone; reading the dataset prepared from it at %s.', config.folder, path
      )
      listing = None

    def stale(data_path):
      if listing is None:
        return None
      stored = _metadata(data_path)
      if stored.get('fingerprint') == listing.fingerprint:
        return None
      if 'fingerprint' not in stored:
        return (
          f'The dataset at {data_path} has no listing fingerprint of '
          f'image folder {config.folder} (an older version wrote it)'
        )
      return (
        f'Image folder {config.folder} changed since {data_path} was '
        f'prepared ({stored.get("num_files", "?")} image files then, '
        f'{len(listing.paths)} now)'
      )

    def make():
      if _is_prepared(path) and not stale(path):
        return tfds.builder_from_directory(path)
      config.classes = tuple(listing.classes)
      return ImageFolderArray(config=config, data_dir=data_dir, listing=listing)

    return _prepare_once(make, path, None, _is_chief(is_chief), timeout_s, stale=stale)
  return open_prepared(name, data_dir)


def open_prepared(name, data_dir):
  """Opens a TFDS dataset that must already be prepared in data_dir."""
  if not name:
    raise DataError(
      "config.data.name is empty: use 'fashion_mnist', 'folder' or a prepared TFDS dataset name."
    )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
      f'config.data.name={name!r}: no such dataset (TFDS: '
      f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). '
      "Use 'fashion_mnist', 'folder', or a TFDS dataset prepared in "
      f'{data_dir}.'
    ) from e
  if not builder.is_prepared():
    raise DataError(
      f'TFDS dataset {name!r} (config.data.name) is not prepared in '
      f'{data_dir} (config.data.data_dir). Prepare it there first, e.g. '
      f'`tfds build {name} --data_dir={data_dir} '
      '--file_format=array_record` (needs TensorFlow and any manual '
      'downloads), or set config.data.data_dir to where it is.'
    )
  return builder


def _split_names(split):
  # 'train', 'train[:10%]', 'train+validation' -> the base split names.
  return [part.split('[', 1)[0].strip() for part in str(split).split('+')]


def check_builder_splits(builder, named_splits, *, hint=''):
  """Raises DataError, in one sentence, for the first split `builder` lacks.

  named_splits: {config field (e.g. 'config.data.eval_split'): split}; slices
  and sums ('train[:10%]', 'train+validation') are checked as TFDS reads
  them. `hint` ends the sentence (what makes the missing split exist).
  """
  available = sorted(builder.info.splits.keys())
  for field, split in named_splits.items():
    missing = [s for s in _split_names(split) if s not in available]
    problem = f'has no split {missing[0]!r}' if missing else None
    if not missing:
      try:
        builder.info.splits[split]  # pylint: disable=pointless-statement
      except Exception as e:  # pylint: disable=broad-except
        problem = f'cannot read it ({str(e).splitlines()[0] if str(e) else e!r})'
    if problem:
      raise DataError(
        f'{field}={split!r}: dataset {builder.info.full_name} '
        f'{problem}; available: {available}{hint}.'
      )


def get_source(data_config, split, *, is_chief=None):
  """A random-access source of {'image': uint8 [H,W,C], 'label': int, ...}; with
  `config.data.in_memory` the split decoded once into memory (`MemorySource`)."""
  builder = prepare(data_config, is_chief=is_chief)
  if data_config.get('in_memory', False):
    return memory_source(builder, data_config, split)
  return source_from_builder(builder, split)


class MemorySource:
  """A split held decoded in memory: the records of the TFDS source, {image_key: uint8
  [H,W,C], 'label': int}, without its per-record file read, parse and PNG decode (about
  0.3 ms of a 2-core host's time per 28x28 record, more than a small model's step spends
  on it)."""

  def __init__(self, images, labels, image_key='image'):
    if len(images) != len(labels):
      raise ValueError(f'{len(images)} images but {len(labels)} labels')
    self._images, self._labels, self._key = images, labels, image_key

  def __len__(self):
    return len(self._images)

  def __getitem__(self, index):
    return {self._key: self._images[index], 'label': int(self._labels[index])}

  def __repr__(self):
    shape = self._images.shape[1:] if isinstance(self._images, np.ndarray) else 'mixed'
    return f'MemorySource({len(self)} x {shape})'


_DECODE_CHUNK = 1000


def memory_source(builder, data_config, split):
  """`split` of `builder` decoded into a `MemorySource`. Fashion-MNIST's plain splits come
  straight from its IDX files (record i is IDX record i, and PNG is lossless); any other
  split is read from the TFDS source in chunks: one array when its images share a shape, else
  a list of them."""
  key = data_config.image_key
  if data_config.name == 'fashion_mnist' and split in FASHION_MNIST_FILES:
    images, labels = load_fashion_mnist(data_config.source_dir, split)
    return MemorySource(images[..., None], labels, key)
  source = source_from_builder(builder, split)
  images, labels = [], np.empty(len(source), np.int64)
  for start in range(0, len(source), _DECODE_CHUNK):
    chunk = source.__getitems__(range(start, min(start + _DECODE_CHUNK, len(source))))
    for i, element in enumerate(chunk, start):
      images.append(np.asarray(element[key]))
      labels[i] = element.get('label', -1)
  if len({image.shape for image in images}) == 1:
    images = np.stack(images)
  return MemorySource(images, labels, key)


def source_from_builder(builder, split):
  available = sorted(builder.info.splits.keys())
  missing = [s for s in _split_names(split) if s not in available]
  if missing:
    raise DataError(
      f'Split {split!r} is not in dataset {builder.info.full_name} '
      f'(config.data.train_split / eval_split); available: {available}.'
    )
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
      f'Cannot open split {split!r} of {builder.info.full_name} in '
      f'{builder.data_path} as a random-access source ({e}). Without '
      'TensorFlow, datasets must be stored as array_record.'
    ) from e
