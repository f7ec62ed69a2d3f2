# Sourced by the launch/*.sh wrappers: where the job runs, from the batch system when there is one.
#
# Sets:  HOSTS (array of node names, in order)   SLOTS (array: ranks on each node)
#        NNODES  NPROC_PER_NODE  NP (total ranks)  NODE_RANK  MASTER_ADDR  MASTER_PORT  PYTHON  BATCH_SYSTEM
#        MPIRUN_ROOT_FLAG (array: --allow-run-as-root when running as root)
# and offers  write_hostfile  (one "host slots=N" line per node, the format DeepSpeed, Open MPI and
# horovodrun all read, at $HOSTFILE) and  run_launcher CMD...  (prints the command; DRY_RUN=1 only prints).
#
# Node list:   SLURM  SLURM_JOB_NODELIST expanded by python-hostlist (`hostlist`, pip install python-hostlist;
#                     ranks per node from SLURM_TASKS_PER_NODE, e.g. "2(x3),1")
#              PBS    PBS_NODEFILE (one line per rank slot; counted per node in order of appearance)
#              none   this machine alone (127.0.0.1, a free port), NPROC_PER_NODE ranks (default: visible GPUs, else 1)
# Overrides:   NPROC_PER_NODE (ranks on every node), MASTER_ADDR, MASTER_PORT, NODE_RANK, HOSTFILE, PYTHON;
#              extra launcher options in TORCHRUN_ARGS, DEEPSPEED_ARGS, MPIRUN_ARGS, HOROVODRUN_ARGS;
#              DRY_RUN=1 prints the launcher command (and writes the hostfile) without starting anything.

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $(basename "$0") TRAINING_SCRIPT [ARGS...]   (see launch/common.sh for the variables it reads)" >&2
    exit 2
fi

HOSTS=()
SLOTS=()
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    BATCH_SYSTEM=slurm
    command -v hostlist >/dev/null || { echo "launch: SLURM node lists need python-hostlist: pip install python-hostlist" >&2; exit 2; }
    if [[ -n "${SLURM_TASKS_PER_NODE:-}" ]]; then
        while read -r host slots; do HOSTS+=("$host"); SLOTS+=("${slots#slots=}"); done < <(
            hostlist --expand --append=' slots=' --append-slurm-tasks="$SLURM_TASKS_PER_NODE" "$SLURM_JOB_NODELIST")
    else
        while read -r host; do HOSTS+=("$host"); SLOTS+=(1); done < <(hostlist --expand "$SLURM_JOB_NODELIST")
    fi
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
    MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}"
elif [[ -n "${PBS_NODEFILE:-}" ]]; then
    BATCH_SYSTEM=pbs
    [[ -r "$PBS_NODEFILE" ]] || { echo "launch: PBS_NODEFILE=$PBS_NODEFILE is not readable" >&2; exit 2; }
    while read -r host slots; do HOSTS+=("$host"); SLOTS+=("$slots"); done < <(
        awk 'NF { if (!($1 in n)) order[k++] = $1; n[$1]++ } END { for (i = 0; i < k; i++) print order[i], n[order[i]] }' \
            "$PBS_NODEFILE")
    NODE_RANK="${NODE_RANK:-${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-0}}}"
    PBS_NUMERIC_ID="${PBS_JOBID%%[!0-9]*}"
    MASTER_PORT="${MASTER_PORT:-$((20000 + ${PBS_NUMERIC_ID:-0} % 10000))}"
else
    BATCH_SYSTEM=none
    gpus=0
    if command -v nvidia-smi >/dev/null; then gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"; fi
    HOSTS=(127.0.0.1)
    SLOTS=("${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}")
    NODE_RANK="${NODE_RANK:-0}"
    MASTER_PORT="${MASTER_PORT:-$("${PYTHON:-python}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
fi

[[ ${#HOSTS[@]} -gt 0 ]] || { echo "launch: the $BATCH_SYSTEM node list is empty" >&2; exit 2; }
if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    for i in "${!SLOTS[@]}"; do SLOTS[$i]="$NPROC_PER_NODE"; done
fi
NPROC_PER_NODE="${SLOTS[0]}"
NNODES="${#HOSTS[@]}"
NP=0
for slots in "${SLOTS[@]}"; do NP=$((NP + slots)); done
MASTER_ADDR="${MASTER_ADDR:-${HOSTS[0]}}"
PYTHON="${PYTHON:-python}"
export MASTER_ADDR MASTER_PORT

# Open MPI refuses to run as root without this flag.
MPIRUN_ROOT_FLAG=()
[[ "$(id -u)" == 0 ]] && MPIRUN_ROOT_FLAG=(--allow-run-as-root)

# write_hostfile: "host slots=N" per node into $HOSTFILE (default: a per-job file under $TMPDIR).
write_hostfile() {
    HOSTFILE="${HOSTFILE:-${TMPDIR:-/tmp}/scaling_plugins.${SLURM_JOB_ID:-${PBS_JOBID:-$$}}.hostfile}"
    : > "$HOSTFILE"
    for i in "${!HOSTS[@]}"; do echo "${HOSTS[$i]} slots=${SLOTS[$i]}" >> "$HOSTFILE"; done
    echo "launch: $BATCH_SYSTEM, $NNODES node(s), $NP rank(s); hostfile $HOSTFILE" >&2
}

# run_launcher CMD...: print the command (as "+ CMD") and run it, unless DRY_RUN=1.
run_launcher() {
    echo "+ $*" >&2
    [[ "${DRY_RUN:-0}" == 1 ]] && exit 0
    exec "$@"
}
