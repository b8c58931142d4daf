#!/usr/bin/env bash
# Submit a pretraining run (or, with `federate`, a federated simulation) to a running Ray cluster's job
# server (`ray job submit`), token-authenticated.
#   scripts/submit.sh [pretrain|federate] HEAD CONFIG RUN_DIR [--set key=value ...]
# HEAD     the head's job API: host (port 8265), host:port or http://host:port; 127.0.0.1 through the SSH
#          tunnel of `ray dashboard scripts/cluster.yaml`
# CONFIG   a YAML config on this machine; it travels with the job (as its working directory)
# RUN_DIR  an absolute path on a filesystem every node shares (each rank writes its checkpoint shard)
# The token is Ray's: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (README,
# "Multi-node"). The job runs `curvtrain pretrain --address auto` (or `curvtrain federate`) on the head with
# the curvtrain installed on the nodes (Ray started from its venv, as scripts/cluster.yaml does); it exits
# like the run does.
set -euo pipefail
command=pretrain
case ${1:-} in pretrain | federate) command=$1; shift ;; esac
if [ $# -lt 3 ]; then sed -n 2,12p "$0" >&2; exit 2; fi
head=$1 config=$2 out=$3
shift 3
case $head in http://* | https://*) ;; *:*) head=http://$head ;; *) head=http://$head:8265 ;; esac
[ -f "$config" ] || { echo "submit.sh: config file not found: $config" >&2; exit 2; }
case $out in /*) ;; *) echo "submit.sh: RUN_DIR must be an absolute path on a filesystem all nodes share, got $out" >&2; exit 2 ;; esac
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  echo "submit.sh: no Ray token in RAY_AUTH_TOKEN, \$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (README, \"Multi-node\")" >&2
  exit 2
fi
job=$(mktemp -d)
trap 'rm -rf "$job"' EXIT
cp "$config" "$job/config.yaml"
ray job submit --address "$head" --working-dir "$job" -- \
  curvtrain "$command" --config config.yaml --out "$out" --address auto "$@"
