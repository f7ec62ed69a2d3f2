#!/usr/bin/env bash
# horovodrun: launch/horovodrun.sh TRAINING_SCRIPT [ARGS...]
# NP ranks over the allocation's hostfile; HOROVOD_CONTROLLER=gloo (default) or mpi picks the controller.
# Needs Horovod built against this torch: `make horovod`.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
command -v horovodrun >/dev/null || { echo "launch: horovodrun not found; build Horovod with: make horovod" >&2; exit 2; }
write_hostfile
run_launcher horovodrun -np "$NP" --hostfile "$HOSTFILE" "--${HOROVOD_CONTROLLER:-gloo}" ${HOROVODRUN_ARGS:-} \
    "$PYTHON" "$@"
