#!/usr/bin/env bash
# Submit a federated simulation to a running Ray cluster (started with `ray up scripts/cluster.yaml`):
#   scripts/federate.sh HEAD configs/fed-fmnist.yaml /shared/runs/fed [--set key=value ...]
# = scripts/submit.sh federate ... (token, HEAD and RUN_DIR as there). The job's driver (the federated
# server) runs `curvtrain federate` on the head node and joins the cluster (--address auto);
# pool.num_actors=0 starts one client actor per CPU slot (per GPU with pool.use_gpu=true) of the whole
# cluster, and RUN_DIR/workers.json records each actor's node. Every node needs the data (e.g. `apt-get
# install dataset-fashion-mnist`, or data.path on a shared filesystem); the run directory (client-state
# store, checkpoints) is written by the driver only.
exec "$(dirname "$0")/submit.sh" federate "$@"
