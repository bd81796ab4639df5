"""The frozen networks the evals measure with, in one registry: how each is checked, loaded,
and which figures it feeds. Training's periodic eval and `--mode=eval` both load them here.

  lpips       the VGG16 LPIPS (`models.lpips`): the per-image `lpips` of the stage-1 eval
              step and the stage-1 perceptual loss; always loaded.
  inception   pytorch-fid's Inception (`fid.Extractor`), when `config.eval.inception_weights`
              or $VQGAN_JAX_INCEPTION names its weights: `rfid` (stage 1), `gfid` and
              `inception_score` (stage 2). `--mode=eval` only: on CPU its 299px forward costs
              more than the whole periodic eval.
  classifier  a classifier run (`classifier_features`), when `config.eval.classifier_workdir`
              names one: `fd_<feature_name>`, and `class_accuracy` of class-conditional
              samples (stage 2).

An extractor (Inception, classifier) maps NHWC images in [-1, 1] to {'features', 'logits',
...}; `extractors` keys them by the metric their statistics give ('fid', 'fd_<name>').
"""

import dataclasses
from typing import Any
from typing import Callable
from typing import Optional

import jax
import tqdm

from vqgan_jax import classifier_features
from vqgan_jax import fid
from vqgan_jax import parallel
from vqgan_jax.models import lpips as lpips_lib


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """`check(config)`: what `load` needs, read and checked before anything is computed (a bad
  file is one error naming its config field; None: the config names no such net, and
  `missing` says what to supply if anything). `load(checked, mesh)`: the net, replicated
  over `mesh`. `metric(net)`: the key its Frechet distance is reported under."""

  feeds: str
  in_training: bool  # loaded by the trainer's periodic eval too
  check: Callable[[Any], Any]
  load: Callable[[Any, Any], Any]
  metric: Optional[Callable[[Any], str]] = None  # None: not a feature extractor
  missing: Optional[str] = None


def load_lpips(mesh) -> tuple:
  """(params, shardings) of the pretrained LPIPS, replicated over `mesh`."""
  params = lpips_lib.load_pretrained_params()
  shardings = jax.tree.map(lambda _: parallel.replicated(mesh), params)
  return jax.device_put(params, shardings), shardings


def _say(line):
  if jax.process_index() == 0:
    tqdm.tqdm.write(line)


def _check_classifier(config):
  workdir = config.eval.classifier_workdir
  if workdir:
    classifier_features.check_workdir(workdir)
  return workdir or None


NETS = {
  'lpips': FeatureNet('lpips', True, lambda config: True, lambda _, mesh: load_lpips(mesh)),
  'inception': FeatureNet(
    'rfid; gfid, inception_score',
    False,
    lambda config: fid.load_weights(config.eval.inception_weights),
    lambda weights, mesh: fid.Extractor(weights, mesh=mesh),
    metric=lambda net: 'fid',
    missing=fid.MISSING_WEIGHTS,
  ),
  'classifier': FeatureNet(
    'fd_<feature_name>; class_accuracy',
    True,
    _check_classifier,
    classifier_features.load_classifier,
    metric=lambda net: f'fd_{net.feature_name}',
  ),
}


def _extractor_names(training):
  return [n for n, net in NETS.items() if net.metric and (net.in_training or not training)]


def check(config, *, training=False) -> dict:
  """{net: what its `check` read} for each extractor this eval uses (`training`: the
  trainer's periodic eval), before anything loads or computes."""
  return {n: NETS[n].check(config) for n in _extractor_names(training)}


def extractors(config, mesh, inception=None, *, training=False) -> dict:
  """{metric: extractor} for the feature nets the config names: 'fid' (the Inception, when its
  weights are given; otherwise one line says which file to supply) and 'fd_<name>' (a
  classifier). `inception`: the weights `check` (or `fid.load_weights`) already read."""
  out = {}
  for name in _extractor_names(training):
    net = NETS[name]
    checked = inception if name == 'inception' and inception is not None else net.check(config)
    if checked is None:
      if net.missing:
        _say(net.missing)
      continue
    ext = net.load(checked, mesh)
    out[net.metric(ext)] = ext
  return out
