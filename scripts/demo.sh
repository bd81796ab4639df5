#!/usr/bin/env bash
# The main job: set up, then run the whole Fashion-MNIST demo on this machine:
#   a small classifier (the feature space of the offline Frechet distance fd_fmnist)
#   -> stage 1 (VQGAN) -> encode the dataset to codes -> stage 2 (class-conditional GPT)
#   -> a grid of guided samples, one row per class -> eval of 1000 class-balanced samples
#   -> the top halves of held-out test images completed by the GPT.
# Arguments go to stage 1's vqgan_jax.main, e.g. --config.train.num_steps=3000.
# Rerunning resumes each stage from its last checkpoint in workdirs/ (a finished stage is
# skipped by its own resume logic; codes are re-encoded only when stage 1 moved on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/malloc.sh
py=.venv/bin/python
# LLVM at -O1 for XLA:CPU's own loops: the same step times here (stage-1 step 1.160 vs
# 1.164 s, GPT step 0.947 vs 0.947 s), 13 s less compiling for stage 1's step. Convs and
# matmuls are library kernels either way.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=1"
clf="workdirs/fashion_mnist_classifier"
stage1="workdirs/fashion_mnist_vqgan"
stage2="workdirs/fashion_mnist_transformer"
start=$SECONDS
marks=""  # "seconds:what;" per stage, for the results file
stamp() { echo "demo: $1 ($((SECONDS - start)) s)"; marks="$marks$((SECONDS - start)):$1;"; }

stamp "training the Fashion-MNIST classifier behind fd_fmnist into $clf"
$py -m vqgan_jax.main --config=configs/fashion_mnist_classifier.py --workdir="$clf"

stamp "stage 1: training the VQGAN into $stage1"
$py -m vqgan_jax.main --config=configs/fashion_mnist_vqgan.py --workdir="$stage1" \
  --config.eval.classifier_workdir="$clf" "$@"
recon="$(ls -1 "$stage1"/reconstructions_*.png | tail -n 1)"

s2=(--config=configs/fashion_mnist_transformer.py --workdir="$stage2"
    --config.stage1_workdir="$stage1")
stamp "encoding Fashion-MNIST to codes with the frozen VQGAN"
# Codes of this stage-1 step are kept; after more stage-1 training they are replaced.
$py -m vqgan_jax.main "${s2[@]}" --mode=encode --config.encode.overwrite=True
stamp "stage 2: training the class-conditional transformer into $stage2"
$py -m vqgan_jax.main "${s2[@]}"
# Sampling, eval and completion draw with the config's sample settings: classifier-free
# guidance at the scale experiments/guidance_sweep.py's rule picked.
stamp "sampling"
$py -m vqgan_jax.main "${s2[@]}" --mode=sample
samples="$(ls -1 "$stage2"/samples_*.png | tail -n 1)"
stamp "evaluating 1000 class-balanced samples against the training images"
$py -m vqgan_jax.main "${s2[@]}" --mode=eval --config.eval.classifier_workdir="$clf" \
  --config.eval.num_samples=1000
stamp "completing the top halves of held-out test images"
$py -m vqgan_jax.main "${s2[@]}" --mode=sample --config.sample.complete_folder=test \
  --config.sample.keep=top_half
completions="$(ls -1 "$stage2"/completions_*_top_half.png | tail -n 1)"
stamp "done"
echo "demo: stage-1 reconstructions (odd rows: held-out inputs, even rows: reconstructions): $recon"
echo "demo: stage-2 samples, one row per class (T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot): $samples"
echo "demo: completions (per row: a held-out test image, its kept top half, 4 completions of the bottom half): $completions"
# The figures above, the stage times and the machine, as one JSON file (README's demo figures
# are quoted from a committed copy of it: docs/demo_results.json).
DEMO_MARKS="$marks" $py - "$clf" "$stage1" "$stage2" <<'PY'
import glob, json, os, sys
sys.path.insert(0, 'experiments')
import machine
clf, stage1, stage2 = sys.argv[1:]
def last_eval(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r for r in rows if r.get('split') == 'eval'][-1]
c, r = last_eval(clf), last_eval(stage1)
g = json.load(open(max(glob.glob(os.path.join(stage2, 'eval_*.json')), key=os.path.getmtime)))
print(f"demo: classifier test accuracy {c['accuracy']:.4f} (its features define fd_fmnist: "
      'an offline Frechet distance, not FID)')
print(f"demo: stage 1 on the 10k test images: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, "
      f"LPIPS {r['lpips']:.3f}, codebook usage {r['codebook_usage']:.1%}, "
      f"perplexity {r['perplexity']:.1f}, fd_fmnist of reconstructions {r['fd_fmnist']:.2f}")
sampler = {k: g['sampler'][k] for k in ('cfg_scale', 'temperature', 'top_k') if k in g['sampler']}
print(f"demo: stage 2, {g['num_samples']} class-balanced samples: fd_fmnist {g['fd_fmnist']:.2f} "
      f"(vs the 60k training images), class accuracy {g['class_accuracy']:.1%} "
      f"(guidance scale {sampler.get('cfg_scale')}, temperature {sampler.get('temperature')}, "
      f"top-k {sampler.get('top_k')})")
marks = [m.split(':', 1) for m in os.environ['DEMO_MARKS'].split(';') if m]
stages = {what: int(t1) - int(t0) for (t0, what), (t1, _) in zip(marks, marks[1:])}
keys = ('psnr', 'ssim', 'lpips', 'codebook_usage', 'perplexity', 'fd_fmnist', 'step')
results = {
  'name': 'demo_fashion_mnist',
  **machine.info(),
  'classifier_accuracy': c['accuracy'],
  'stage1': {k: r[k] for k in keys if k in r},
  'stage2': {
    'eval_bits_per_code': last_eval(stage2).get('bits_per_token'),
    **{k: g[k] for k in ('num_samples', 'fd_fmnist', 'class_accuracy') if k in g},
    'sampler': sampler,
  },
  'stage_seconds': stages,
  'total_minutes': round(int(marks[-1][0]) / 60, 1),
}
path = os.path.join(os.path.dirname(stage1), 'demo_results.json')
with open(path, 'w') as f:
  json.dump(results, f, indent=1)
print(f'demo: figures, stage times and machine: {path}')
PY
