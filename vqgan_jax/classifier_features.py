"""A trained classifier run (`configs/fashion_mnist_classifier.py`) as a feature extractor
with the FID Inception's interface (`fid.Extractor`): penultimate features for an offline
Frechet distance, reported as `fd_<feature_name>` (never as FID), and logits for the class
accuracy of class-conditional samples."""

import dataclasses
import hashlib
import os
from typing import Any

import jax
import ml_collections

from vqgan_jax import checkpoints
from vqgan_jax import parallel
from vqgan_jax.models import classifier as classifier_lib


@dataclasses.dataclass(eq=False)
class ClassifierExtractor:
  """`__call__(images)`: (B, H, W, C) in [-1, 1] (resized to the classifier's training size
  when they differ) -> {'features': (B, hidden), 'logits': (B, num_classes)}, float32,
  data-parallel over `mesh`."""

  model: classifier_lib.Classifier
  params: Any
  mesh: jax.sharding.Mesh
  image_size: int
  feature_name: str  # the metric is fd_<feature_name>
  name: str  # identifies the feature space in cached statistics: run, step, name
  feature_dim: int
  num_classes: int

  def __post_init__(self):
    self._batch = parallel.batch_sharding(self.mesh)
    rep = parallel.replicated(self.mesh)
    self.params = jax.device_put(self.params, rep)
    size, model = self.image_size, self.model

    def apply(params, x):
      x = x.astype(jax.numpy.float32)
      if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), 'bilinear')
      features, logits = model.apply({'params': params}, x)
      return {'features': features, 'logits': logits}

    self._fn = jax.jit(apply, in_shardings=(rep, self._batch), out_shardings=self._batch)

  def __call__(self, images):
    return self._fn(self.params, jax.device_put(images, self._batch))


FIELD = 'config.eval.classifier_workdir'


def check_workdir(workdir) -> None:
  """CheckpointError naming `FIELD` unless `workdir` holds a checkpoints/ folder (a cheap
  check for before anything is computed; `load_classifier` reads the rest)."""
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    what = 'does not exist' if not os.path.exists(workdir) else 'has no checkpoints/ folder'
    raise checkpoints.CheckpointError(
      f'{FIELD}={os.fspath(workdir)!r} {what}: point it at the workdir of a classifier run '
      '(configs/fashion_mnist_classifier.py)'
    )


def load_classifier(workdir, mesh, step=None) -> ClassifierExtractor:
  """The classifier of a `stage='classifier'` workdir (latest checkpoint by default)."""
  check_workdir(workdir)
  with checkpoints.Checkpointer(workdir, read_only=True, max_to_keep=None) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise checkpoints.CheckpointError(
        f'No checkpoint in {ckpt.directory} ({FIELD}): train it with '
        'configs/fashion_mnist_classifier.py first.'
      )
    config = ml_collections.ConfigDict(ckpt.restore_config(step))
  if config.get('stage') != 'classifier':
    raise checkpoints.CheckpointError(
      f'{workdir} ({FIELD}) is a {config.get("stage")!r} run, not a classifier'
    )
  model = classifier_lib.from_config(config.model)
  size = config.data.image_size
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, size, size, 3)))['params']
  )
  rep = parallel.replicated(mesh)
  params = checkpoints.restore_params(
    workdir, checkpoints.abstract_like(abstract, jax.tree.map(lambda _: rep, abstract)), step=step
  )
  run = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:8]
  return ClassifierExtractor(
    model=model,
    params=params,
    mesh=mesh,
    image_size=size,
    feature_name=config.model.feature_name,
    name=f'classifier-{config.model.feature_name}-{run}-{step}',
    feature_dim=config.model.hidden,
    num_classes=config.model.num_classes,
  )
