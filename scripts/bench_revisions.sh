#!/usr/bin/env bash
# Step time of two checkouts of curvtrain in one interleaved run: for each repeat and each bench_pretrain
# row, the row runs once in OLD's checkout and once in NEW's (each with its own .venv), alternating, so
# both see the same machine load. Prints each run's ms/step; the median and range per (row, checkout)
# come from the JSON files it leaves in OUT.
#   scripts/bench_revisions.sh OLD_CHECKOUT NEW_CHECKOUT OUT REPEATS ROW... [-- bench_pretrain args]
set -euo pipefail
old=$1 new=$2 out=$3 repeats=$4; shift 4
rows=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do rows+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
for r in $(seq 1 "$repeats"); do
  for row in "${rows[@]}"; do
    for side in old new; do
      dir=${!side}
      (cd "$dir" && .venv/bin/python scripts/bench_pretrain.py --optimizers "$row" --repeats 1 \
        --json "$out/$side-$row-$r.json" "$@" | tail -n 1 | sed "s/^/$side r$r: /")
    done
  done
done
