#!/usr/bin/env bash
# Build the BIG benchmark input once (cached under bench/work): a Python venv with torch, its
# GPU libraries cuDNN and cuBLAS, the CUDA C++ headers, triton, torch's pure-Python dependencies
# and pandas, all from PyPI,
# as one layer: big.tar (plain) and big.tar.gz (pigz -6). Aims at more than 20k files and
# about 1.5 GB of gzip. Wheels are cached in bench/work/wheels, so a rebuild is offline.
set -euo pipefail
work=${BENCH_WORK:-$(cd "$(dirname "$0")" && pwd)/work}
mkdir -p "$work"
cd "$work"

pkgs=(torch triton nvidia-cudnn-cu13 nvidia-cublas nvidia-cuda-cccl
  sympy mpmath networkx jinja2 markupsafe filelock fsspec typing-extensions setuptools
  numpy pandas python-dateutil tzdata)

if [ ! -f big.tar ]; then
  py=$(command -v python3)
  mkdir -p wheels
  # Fetch what is missing (a no-op once cached): torch's and pandas' full dependency sets,
  # of which the list above is installed.
  ls wheels/torch-*.whl wheels/pandas-*.whl >/dev/null 2>&1 ||
    "$py" -m pip download -q -d wheels torch pandas
  rm -rf big-root
  "$py" -m venv big-root/venv
  big-root/venv/bin/pip install -q --disable-pip-version-check --no-index --find-links wheels \
    --no-deps "${pkgs[@]}"
  find big-root -name __pycache__ -prune -exec rm -rf {} +
  tar --format=posix --numeric-owner -C big-root -cf big.tar.tmp .
  mv big.tar.tmp big.tar
  rm -rf big-root
fi
[ -f big.tar.gz ] || { pigz -6 -c big.tar > big.tar.gz.tmp && mv big.tar.gz.tmp big.tar.gz; }
printf '%-8s %6d entries %6d MB tar %6d MB gzip\n' big "$(tar -tf big.tar | wc -l)" \
  $(( $(stat -c %s big.tar) >> 20 )) $(( $(stat -c %s big.tar.gz) >> 20 ))
