"""The Fashion-MNIST classifier behind the demo's offline Frechet distance (`fd_fmnist`) and
sample class accuracy: a few minutes on 2 CPU cores, >= 90% test accuracy.

python -m vqgan_jax.main --config=configs/fashion_mnist_classifier.py \
    --workdir=workdirs/fashion_mnist_classifier

It sees images exactly as the demo VQGAN does (32x32, gray repeated to RGB).
"""

from vqgan_jax import config_base as base


def get_config(arg=None):
  args = base.parse_arg(arg)
  c = base.classifier_base()
  c.model.feature_name = 'fmnist'
  c.data.update(base.fashion_mnist_data())
  if args.get('smoke'):
    c.train.update(num_steps=20, log_every=10, eval_every=20, checkpoint_every=20)
    c.data.eval_examples = 500
  return c
