#!/usr/bin/env bash
# What one device call carries, against its 64 MiB limit: the working tree that travels (tracked and untracked,
# not ignored, files) plus the carried ignored folders .whl/ and .gpu-cache/. Exits 1 when over.
set -euo pipefail
cd "$(dirname "$0")/../.."
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s+=$1} END {print s+0}')
folder() { if [ -d "$1" ]; then find "$1" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}'; else echo 0; fi; }
wheels=$(folder .whl)
cache=$(folder .gpu-cache)
total=$((tree + wheels + cache))
limit=$((64 * 1024 * 1024))
mib() { awk -v b="$1" 'BEGIN {printf "%6.1f MiB", b / 1048576}'; }
echo "carried: repository $(mib "$tree") + .whl $(mib "$wheels") + .gpu-cache $(mib "$cache") = $(mib "$total") of $(mib "$limit")"
[ "$total" -le "$limit" ] || { echo "over the device call's 64 MiB: shrink the cache (SIZE, BUDGET_MIB)"; exit 1; }
