#!/usr/bin/env bash
# Prepares a fresh Debian machine with Python 3.11: the Fashion-MNIST files (Debian package)
# and a virtualenv in .venv with vqgan_jax installed (editable) plus the extras asked for.
#   scripts/setup.sh [extras]     e.g. scripts/setup.sh test,reference
# Reruns are cheap: the install is skipped while setup.cfg and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

fmnist=/usr/share/datasets/fashion-mnist
if [ ! -f "$fmnist/t10k-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "setup: installing Debian's dataset-fashion-mnist into $fmnist"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: warning: no apt-get; put the four Fashion-MNIST IDX .gz files into a folder" \
         "and pass --config.data.source_dir=DIR" >&2
  fi
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
