#!/usr/bin/env bash
# Prepares a fresh Debian machine with Python 3.11: the Fashion-MNIST files (Debian package)
# and a virtualenv in .venv with vqgan_jax installed (editable) plus the extras asked for.
#   scripts/setup.sh [extras]     e.g. scripts/setup.sh test,reference
# Reruns are cheap: the install is skipped while setup.cfg and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

fmnist=/usr/share/datasets/fashion-mnist
# TCMalloc: XLA:CPU allocates each step's temporaries afresh, and glibc maps and unmaps the large
# ones every step; preloaded (scripts/malloc.sh), TCMalloc reuses them (the benchmark GPT's bf16
# train step 847 against 1185 ms on the AVX-512 VM). Optional: installed where apt-get runs
# without a password prompt (root, or sudo -n), once per machine; the scripts run without it.
tried="${XDG_CACHE_HOME:-$HOME/.cache}/vqgan_jax/tcmalloc-install-tried"
packages=()
[ -f "$fmnist/t10k-images-idx3-ubyte.gz" ] || packages+=(dataset-fashion-mnist)
if [ -z "$(bash scripts/tcmalloc_path.sh)" ] && [ "${VQGAN_JAX_TCMALLOC:-1}" != 0 ] \
  && [ ! -f "$tried" ] \
  && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
  packages+=(libtcmalloc-minimal4)
  mkdir -p "$(dirname "$tried")" && touch "$tried"
fi
if [ ${#packages[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing Debian's ${packages[*]}"
  $sudo apt-get update -qq >/dev/null || true
  for package in "${packages[@]}"; do
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >/dev/null \
      || echo "setup: warning: apt-get could not install $package" >&2
  done
fi
if [ ! -f "$fmnist/t10k-images-idx3-ubyte.gz" ]; then
  echo "setup: warning: no Fashion-MNIST in $fmnist; put the four IDX .gz files into a" \
       "folder and pass --config.data.source_dir=DIR" >&2
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.vqgan_jax-installed"
want="$(cat setup.cfg pyproject.toml reference-constraints.txt 2>/dev/null | sha1sum | cut -d' ' -f1) [$extras]"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing vqgan_jax${extras:+[$extras]} into .venv (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  constraints=()
  [ -f reference-constraints.txt ] && constraints=(-c reference-constraints.txt)
  .venv/bin/python -m pip install -q "${constraints[@]}" -e ".${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
