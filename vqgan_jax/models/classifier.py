"""A small convolutional image classifier: its penultimate features define the offline
Frechet distance (`fd_<name>`) of `--mode=eval` where no Inception weights exist, and its
labels measure whether class-conditional samples show their class."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class Classifier(nn.Module):
  """A patchify stem (conv patch x patch, stride patch) -> conv3x3-relu per width -> dense
  `hidden` (the features) -> logits. The stem keeps every pixel (patch^2 <= its width) while
  the later convs run at a resolution and width XLA:CPU computes efficiently.

  Input NHWC in [-1, 1] at the size it was trained on, any channel count: channels are
  averaged to gray, so RGB-ified grayscale data and a model's 1- or 3-channel outputs give
  the same features.
  """

  patch: int = 4
  features: Sequence[int] = (64, 64, 64)
  hidden: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    """Returns (penultimate features (B, hidden), logits (B, num_classes)), float32."""
    h = jnp.mean(x.astype(jnp.float32), axis=-1, keepdims=True)
    p = self.patch
    h = nn.relu(nn.Conv(self.features[0], (p, p), strides=(p, p), padding='VALID', name='stem')(h))
    for i, width in enumerate(self.features[1:]):
      h = nn.relu(nn.Conv(width, (3, 3), name=f'conv{i}')(h))
    h = h.reshape(h.shape[0], -1)
    features = nn.relu(nn.Dense(self.hidden, name='hidden')(h))
    return features, nn.Dense(self.num_classes, name='head')(features)


def from_config(fields) -> Classifier:
  return Classifier(
    patch=fields['patch'],
    features=tuple(fields['features']),
    hidden=fields['hidden'],
    num_classes=fields['num_classes'],
  )
