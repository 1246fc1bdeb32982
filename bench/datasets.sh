#!/usr/bin/env bash
# Build the benchmark inputs once (cached under bench/work): a Debian rootfs from
# debootstrap, and a Python environment with more than 20k files from PyPI, each as a plain
# tar and a gzip tar.
set -euo pipefail
work=${BENCH_WORK:-$(cd "$(dirname "$0")" && pwd)/work}
mkdir -p "$work"
cd "$work"

if [ ! -f debian.tar ]; then
  command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  rm -rf debian-root
  debootstrap --variant=minbase bookworm debian-root >/dev/null
  tar --format=posix --numeric-owner --xattrs -C debian-root -cf debian.tar.tmp .
  mv debian.tar.tmp debian.tar
  rm -rf debian-root
fi

if [ ! -f python.tar ]; then
  rm -rf py-root
  python3 -m venv py-root/venv
  py-root/venv/bin/pip install -q --disable-pip-version-check \
    numpy scipy pandas sympy matplotlib scikit-learn networkx pillow requests jinja2 plotly
  tar --format=posix --numeric-owner -C py-root -cf python.tar.tmp .
  mv python.tar.tmp python.tar
  rm -rf py-root
fi

for t in debian python; do
  [ -f "$t.tar.gz" ] || pigz -6 -k -c "$t.tar" > "$t.tar.gz"
done
for t in debian python; do
  printf '%-8s %6d entries %6d MB tar %6d MB gzip\n' "$t" "$(tar -tf "$t.tar" | wc -l)" \
    $(( $(stat -c %s "$t.tar") >> 20 )) $(( $(stat -c %s "$t.tar.gz") >> 20 ))
done
