#!/usr/bin/env bash
# The main job: set up, then run the whole Fashion-MNIST demo on this machine:
#   stage 1 (VQGAN)  -> encode the dataset to codes -> stage 2 (class-conditional GPT)
#   -> a grid of samples, one row per class.
# Arguments go to stage 1's vqgan_jax.main, e.g. --config.train.num_steps=3000.
# Rerunning resumes each stage from its last checkpoint in workdirs/ (a finished stage is
# skipped by its own resume logic; codes are re-encoded only when stage 1 moved on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python
stage1="workdirs/fashion_mnist_vqgan"
stage2="workdirs/fashion_mnist_transformer"
start=$SECONDS
stamp() { echo "demo: $1 ($((SECONDS - start)) s)"; }

stamp "stage 1: training the VQGAN into $stage1"
$py -m vqgan_jax.main --config=configs/fashion_mnist_vqgan.py --workdir="$stage1" "$@"
recon="$(ls -1 "$stage1"/reconstructions_*.png | tail -n 1)"

s2=(--config=configs/fashion_mnist_transformer.py --workdir="$stage2"
    --config.stage1_workdir="$stage1")
stamp "encoding Fashion-MNIST to codes with the frozen VQGAN"
# Codes of this stage-1 step are kept; after more stage-1 training they are replaced.
$py -m vqgan_jax.main "${s2[@]}" --mode=encode --config.encode.overwrite=True
stamp "stage 2: training the class-conditional transformer into $stage2"
$py -m vqgan_jax.main "${s2[@]}"
stamp "sampling"
$py -m vqgan_jax.main "${s2[@]}" --mode=sample
samples="$(ls -1 "$stage2"/samples_*.png | tail -n 1)"
stamp "done"
echo "demo: stage-1 reconstructions (odd rows: held-out inputs, even rows: reconstructions): $recon"
echo "demo: stage-2 samples, one row per class (T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot): $samples"
