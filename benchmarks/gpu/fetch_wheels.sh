#!/usr/bin/env bash
# Download the wheels that the H100 / H200 machines (one image) lack (wheels.txt) for CPython 3.12 / manylinux x86_64
# into .whl/ at the repository root (ignored by git; the device call carries it), drop any other wheel there, and
# check that every requirement is met there (check_wheels.py). Run it here, where pip reaches the package registry:
#   benchmarks/gpu/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
mkdir -p .whl
pins=$(sed 's/#.*//' benchmarks/gpu/wheels.txt | tr -s ' \t' '\n' | grep '==' || true)
# Pins marked "sdist only": no wheel to download; build a pure-Python one here instead.
sdists=$(grep 'sdist only' benchmarks/gpu/wheels.txt | sed 's/#.*//' | tr -d ' ' || true)
# The device documentation's pip download line (README.md of the device tool), for every pinned wheel.
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(echo "$pins" | grep -vxF "$sdists")
for pin in $sdists; do
  "$PY" -m pip wheel --quiet --no-deps -w .whl "$pin"
done
# Keep one version of each: a wheel not pinned in wheels.txt (an older download) would stop the install there.
for wheel in .whl/*.whl; do
  base=$(basename "$wheel")
  name=$(echo "${base%%-*}" | tr 'A-Z_.' 'a-z--')
  version=$(echo "$base" | cut -d- -f2)
  if ! echo "$pins" | tr 'A-Z_.' 'a-z--' | grep -qx "$name==$(echo "$version" | tr 'A-Z_' 'a-z-')"; then
    echo "removing $base (not pinned in wheels.txt)"
    rm -f "$wheel"
  fi
done
"$PY" benchmarks/gpu/check_wheels.py .whl
du -cb .whl/*.whl | tail -1 | awk '{printf "%d wheels, %.1f MiB in .whl/\n", '"$(ls .whl/*.whl | wc -l)"', $1 / 1048576}'
