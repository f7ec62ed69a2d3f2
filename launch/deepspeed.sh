#!/usr/bin/env bash
# The deepspeed launcher: launch/deepspeed.sh TRAINING_SCRIPT [ARGS...]
# Writes the allocation's hostfile ("host slots=N").
#   SLURM, several nodes: no ssh. This script starts itself once per node with srun, and each copy runs
#         `deepspeed --no_ssh --node_rank N`, which starts that node's ranks only.
#   PBS, several nodes: deepspeed starts every node from here over ssh (pdsh; DEEPSPEED_ARGS="--launcher
#         openmpi" uses mpirun instead); the nodes must answer ssh.
#   One node (or no batch system): runs locally, no ssh.
# The script receives --local_rank=N as DeepSpeed passes it.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
write_hostfile
require_free_master_port
where=(--no_ssh_check)   # one node runs locally: no ssh needed
if [[ "$NNODES" -gt 1 && "$BATCH_SYSTEM" == slurm ]]; then
    [[ -n "${SCALING_PLUGINS_ON_NODE:-}" ]] || once_per_node "${BASH_SOURCE[0]}" "$@"
    where=(--no_ssh --node_rank "$NODE_RANK")
elif [[ "$NNODES" -gt 1 ]]; then
    check_hosts_answer
    where=()
fi
run_launcher deepspeed --hostfile "$HOSTFILE" "${where[@]}" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" ${DEEPSPEED_ARGS:-} "$@"
