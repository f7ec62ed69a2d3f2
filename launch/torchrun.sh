#!/usr/bin/env bash
# torchrun: launch/torchrun.sh TRAINING_SCRIPT [ARGS...]
# One node (or no batch system): torchrun with NPROC_PER_NODE ranks here.
# Several nodes: torchrun runs once per node, so this script starts itself on every node first
# (once_per_node: SLURM srun, one task per node, no ssh; PBS: mpirun --map-by ppr:1:node); each copy takes its
# node rank from SLURM_NODEID or its MPI rank. Rendezvous: static, at the allocation's first node
# (MASTER_ADDR:MASTER_PORT). Every node must have the same number of ranks.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_uniform_slots torchrun
if [[ "$NNODES" -gt 1 && -z "${SCALING_PLUGINS_ON_NODE:-}" ]]; then
    once_per_node "${BASH_SOURCE[0]}" "$@"
fi
run_launcher torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ${TORCHRUN_ARGS:-} "$@"
