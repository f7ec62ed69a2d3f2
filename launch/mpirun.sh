#!/usr/bin/env bash
# Open MPI's mpirun: launch/mpirun.sh TRAINING_SCRIPT [ARGS...]
# NP ranks over the allocation's hostfile, ranks filled node by node; MASTER_ADDR/MASTER_PORT exported for
# torch.distributed (the training script reads its rank from OMPI_COMM_WORLD_RANK). Runs as root when it must.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
write_hostfile
require_free_master_port
[[ "$NNODES" -gt 1 && "$BATCH_SYSTEM" != slurm ]] && check_hosts_answer   # under SLURM mpirun uses srun
run_launcher mpirun -np "$NP" --hostfile "$HOSTFILE" --map-by slot "${MPIRUN_ROOT_FLAG[@]}" \
    -x MASTER_ADDR -x MASTER_PORT -x GLOO_SOCKET_IFNAME -x NCCL_SOCKET_IFNAME -x HOROVOD_GLOO_IFACE ${MPIRUN_ARGS:-} "$PYTHON" "$@"
