#!/usr/bin/env bash
# The deepspeed launcher: launch/deepspeed.sh TRAINING_SCRIPT [ARGS...]
# Writes the allocation's hostfile ("host slots=N") and starts every node from here (DeepSpeed uses pdsh by
# default; set DEEPSPEED_ARGS="--launcher openmpi" or "--launcher slurm" where pdsh is not available).
# A single-node hostfile runs locally (no ssh check). The script receives --local_rank=N as DeepSpeed passes it.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
write_hostfile
single_node=()
[[ "$NNODES" == 1 ]] && single_node=(--no_ssh_check)   # one node runs locally: no ssh needed
run_launcher deepspeed --hostfile "$HOSTFILE" "${single_node[@]}" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" ${DEEPSPEED_ARGS:-} "$@"
