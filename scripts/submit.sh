#!/usr/bin/env bash
# Submit a pretraining run to a running Ray cluster (started with `ray up scripts/cluster.yaml`).
#   scripts/submit.sh HEAD_ADDRESS configs/1b-gpu.yaml /shared/runs/1b [--set key=value ...]
# The job's driver runs `curvtrain pretrain` on the head node and joins the cluster (--address auto).
set -euo pipefail
head=$1 config=$2 out=$3
shift 3
exec ray job submit --address "http://$head:8265" --working-dir . -- \
  curvtrain pretrain --config "$config" --out "$out" --address auto "$@"
