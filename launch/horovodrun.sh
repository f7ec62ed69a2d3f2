#!/usr/bin/env bash
# horovodrun: launch/horovodrun.sh TRAINING_SCRIPT [ARGS...]
# NP ranks over the allocation's hostfile; HOROVOD_CONTROLLER=gloo (default) or mpi picks the controller.
# SLURM, several nodes: horovodrun would ssh into the nodes, so the ranks start through Open MPI's mpirun
# instead (which starts its daemons with srun: no ssh), with Horovod's MPI controller. Elsewhere with several
# nodes horovodrun goes over ssh, and the nodes must answer it.
# Needs Horovod built against this torch: `make horovod`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
command -v horovodrun >/dev/null || die "horovodrun not found; build Horovod with: make horovod"
if [[ "$NNODES" -gt 1 && "$BATCH_SYSTEM" == slurm ]]; then
    echo "launch: SLURM with several nodes: Horovod through mpirun (no ssh between nodes)" >&2
    exec "$(dirname "${BASH_SOURCE[0]}")/mpirun.sh" "$@"
fi
write_hostfile
[[ "$NNODES" -gt 1 ]] && check_hosts_answer
run_launcher horovodrun -np "$NP" --hostfile "$HOSTFILE" "--${HOROVOD_CONTROLLER:-gloo}" ${HOROVODRUN_ARGS:-} \
    "$PYTHON" "$@"
