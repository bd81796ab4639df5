#!/usr/bin/env bash
# The main job: set up, then train the Fashion-MNIST VQGAN demo (stage 1) on this machine.
# Extra arguments go to vqgan_jax.main, e.g. --config.train.num_steps=3000.
# Rerunning resumes from the last checkpoint in workdirs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workdir="workdirs/fashion_mnist_vqgan"
.venv/bin/python -m vqgan_jax.main --config=configs/fashion_mnist_vqgan.py --workdir="$workdir" "$@"
grid="$(ls -1 "$workdir"/reconstructions_*.png | tail -n 1)"
echo "demo: reconstructions of held-out Fashion-MNIST images (odd rows: inputs, even rows: reconstructions): $grid"
