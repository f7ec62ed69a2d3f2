#!/usr/bin/env bash
# torchrun: launch/torchrun.sh TRAINING_SCRIPT [ARGS...]
# One node (or no batch system): torchrun with NPROC_PER_NODE ranks here.
# Several nodes: torchrun runs once per node, so this script starts itself on every node first
# (SLURM: srun --ntasks-per-node=1; PBS: mpirun --map-by ppr:1:node); each copy takes its node rank from
# SLURM_NODEID or its MPI rank. Rendezvous: static, at the allocation's first node (MASTER_ADDR:MASTER_PORT).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ "$NNODES" -gt 1 && -z "${SCALING_PLUGINS_ON_NODE:-}" ]]; then
    export SCALING_PLUGINS_ON_NODE=1 NPROC_PER_NODE
    case "$BATCH_SYSTEM" in
        slurm)
            run_launcher srun --nodes "$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${BASH_SOURCE[0]}" "$@" ;;
        pbs)
            write_hostfile
            run_launcher mpirun -np "$NNODES" --hostfile "$HOSTFILE" --map-by ppr:1:node "${MPIRUN_ROOT_FLAG[@]}" \
                -x SCALING_PLUGINS_ON_NODE -x NPROC_PER_NODE -x MASTER_ADDR -x MASTER_PORT "${BASH_SOURCE[0]}" "$@" ;;
    esac
fi
run_launcher torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ${TORCHRUN_ARGS:-} "$@"
