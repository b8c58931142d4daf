#!/usr/bin/env bash
# Submit a federated simulation to a running Ray cluster (started with `ray up scripts/cluster.yaml`).
#   scripts/federate.sh HEAD_ADDRESS configs/fed-fmnist.yaml /shared/runs/fed [--set key=value ...]
# The job's driver (the federated server) runs `curvtrain federate` on the head node and joins the
# cluster (--address auto); pool.num_actors=0 starts one client actor per CPU slot (per GPU with
# pool.use_gpu=true) of the whole cluster. Every node needs the data (e.g. `apt-get install
# dataset-fashion-mnist`, or data.path on a shared filesystem); the run directory (client-state store,
# checkpoints) is written by the driver only.
set -euo pipefail
head=$1 config=$2 out=$3
shift 3
exec ray job submit --address "http://$head:8265" --working-dir . -- \
  curvtrain federate --config "$config" --out "$out" --address auto "$@"
