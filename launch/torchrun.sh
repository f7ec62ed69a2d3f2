#!/usr/bin/env bash
# torchrun: launch/torchrun.sh TRAINING_SCRIPT [ARGS...]
# One node (or no batch system): torchrun with NPROC_PER_NODE ranks here.
# Several nodes: torchrun runs once per node, so this script starts itself on every node first
# (once_per_node: SLURM srun, one task per node, no ssh; PBS: mpirun --map-by ppr:1:node); each copy takes its
# node rank from SLURM_NODEID or its MPI rank. Rendezvous at the allocation's first node (MASTER_ADDR:MASTER_PORT):
# static, or c10d when TORCHRUN_ARGS asks for restarts (--max-restarts N): only a c10d rendezvous restarts every
# node's workers together, and only with a fresh store per round (below). Every node must have the same number
# of ranks.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_uniform_slots torchrun
require_free_master_port
# A fresh TCPStore per rendezvous round: torchrun's shared store keeps the previous round's keys, so a restarted
# round can read a dead rank's address (pytorch/pytorch#135712). The static rendezvous always shares its store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
if [[ " ${TORCHRUN_ARGS:-} " =~ \ --max[-_]restarts ]]; then
    RENDEZVOUS=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
                --rdzv-id "${SLURM_JOB_ID:-${PBS_JOBID:-scaling-plugins-$MASTER_PORT}}")
else
    RENDEZVOUS=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
if [[ "$NNODES" -gt 1 && -z "${SCALING_PLUGINS_ON_NODE:-}" ]]; then
    once_per_node "${BASH_SOURCE[0]}" "$@"
fi
run_launcher torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" "${RENDEZVOUS[@]}" \
    ${TORCHRUN_ARGS:-} "$@"
