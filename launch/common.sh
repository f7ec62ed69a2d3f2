# Sourced by the launch/*.sh wrappers: where the job runs, from the batch system when there is one.
#
# Sets:  HOSTS (array of node names, in order)   SLOTS (array: ranks on each node)
#        NNODES  NPROC_PER_NODE  NP (total ranks)  NODE_RANK  MASTER_ADDR  MASTER_PORT  PYTHON  BATCH_SYSTEM
#        MPIRUN_ROOT_FLAG (array: --allow-run-as-root when running as root)
#        GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME HOROVOD_GLOO_IFACE OMPI_MCA_btl_tcp_if_include
#                    (exported; the interface of the route to
#                     MASTER_ADDR, so that a node with several interfaces uses the one that reaches the others;
#                     each one the user set is kept)
# and offers  write_hostfile  (one "host slots=N" line per node, the format DeepSpeed, Open MPI and
# horovodrun all read, at $HOSTFILE), run_launcher CMD...  (prints the command; DRY_RUN=1 only prints),
# once_per_node SCRIPT ARGS...  (starts SCRIPT once on every node: srun under SLURM, mpirun under PBS),
# require_uniform_slots LAUNCHER,  require_free_master_port  and  check_hosts_answer  (refuse, with a message,
# what cannot work). NPROC_PER_NODE, when set, must be an integer >= 1.
#
# Node list:   SLURM  SLURM_JOB_NODELIST expanded by python-hostlist (`hostlist`, pip install python-hostlist;
#                     ranks per node from SLURM_TASKS_PER_NODE, e.g. "2(x3),1")
#              PBS    PBS_NODEFILE (one line per rank slot; counted per node in order of appearance)
#              SCALING_PLUGINS_NODES  "host:slots,..." (what once_per_node hands the copies it starts under PBS)
#              none   this machine alone (127.0.0.1, a free port), NPROC_PER_NODE ranks (default: visible GPUs, else 1)
# Overrides:   NPROC_PER_NODE (ranks on every node), MASTER_ADDR, MASTER_PORT, NODE_RANK, HOSTFILE, PYTHON;
#              extra launcher options in TORCHRUN_ARGS, DEEPSPEED_ARGS, MPIRUN_ARGS, HOROVODRUN_ARGS;
#              DRY_RUN=1 prints the launcher command (and writes the hostfile) without starting anything.

set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $(basename "$0") TRAINING_SCRIPT [ARGS...]   (see launch/common.sh for the variables it reads)" >&2
    exit 2
fi

die() { echo "launch: $*" >&2; exit 2; }

# NPROC_PER_NODE, when set: a whole number of ranks >= 1 (checked before anything reads it or starts; read in
# base 10, so that 08 is 8, not a bad octal number).
if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    [[ "$NPROC_PER_NODE" =~ ^[0-9]{1,6}$ ]] && (( 10#$NPROC_PER_NODE >= 1 )) \
        || die "NPROC_PER_NODE=$(printf '%q' "$NPROC_PER_NODE") is not a number of ranks: set it to an integer" \
            ">= 1 (the ranks to start on every node), or leave it unset (default: the batch system's, else the" \
            "visible GPUs, else 1)"
    NPROC_PER_NODE=$((10#$NPROC_PER_NODE))
fi

HOSTS=()
SLOTS=()
if [[ -n "${SLURM_JOB_NODELIST+set}" ]]; then
    BATCH_SYSTEM=slurm
    [[ -n "$SLURM_JOB_NODELIST" ]] || die "SLURM_JOB_NODELIST is set but empty: no nodes to run on"
    command -v hostlist >/dev/null || die "SLURM node lists need python-hostlist: pip install python-hostlist"
    if [[ -n "${SLURM_TASKS_PER_NODE:-}" ]]; then
        expanded="$(hostlist --expand --append=' slots=' --append-slurm-tasks="$SLURM_TASKS_PER_NODE" \
            "$SLURM_JOB_NODELIST" 2>&1)" || die "cannot read SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST with" \
            "SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE: $expanded"
        while read -r host slots; do HOSTS+=("$host"); SLOTS+=("${slots#slots=}"); done <<< "$expanded"
    else
        expanded="$(hostlist --expand "$SLURM_JOB_NODELIST" 2>&1)" \
            || die "cannot read SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST: $expanded"
        while read -r host; do HOSTS+=("$host"); SLOTS+=(1); done <<< "$expanded"
    fi
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
    MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}"
elif [[ -n "${SCALING_PLUGINS_NODES:-}" ]]; then   # "host:slots,..." from once_per_node (PBS), on every node
    BATCH_SYSTEM=forwarded
    IFS=, read -r -a entries <<< "$SCALING_PLUGINS_NODES"
    for entry in "${entries[@]}"; do HOSTS+=("${entry%:*}"); SLOTS+=("${entry##*:}"); done
    NODE_RANK="${NODE_RANK:-${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-0}}}"
    MASTER_PORT="${MASTER_PORT:?once_per_node forwards MASTER_PORT}"
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

[[ ${#HOSTS[@]} -gt 0 ]] || die "the $BATCH_SYSTEM node list is empty"
if [[ "${DRY_RUN:-0}" != 1 ]]; then   # a dry run only prints: its nodes need not exist
    for host in "${HOSTS[@]}"; do
        getent ahosts "$host" >/dev/null || die "node $host of the $BATCH_SYSTEM node list does not resolve (unknown host)"
    done
fi
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

# route_iface ADDR: the interface this host reaches ADDR through (the one holding ADDR when it is local).
route_iface() {
    local addr dev
    addr="$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 { print $1 }' || true)"
    [[ -n "$addr" ]] && command -v ip >/dev/null || return 0
    dev="$(ip -o addr show to "$addr" 2>/dev/null | awk 'NR == 1 { print $2 }' || true)"
    [[ -n "$dev" ]] || dev="$(ip route get "$addr" 2>/dev/null \
        | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }' || true)"
    echo "$dev"
}
IFACE="$(route_iface "$MASTER_ADDR" || true)"
if [[ -n "$IFACE" ]]; then
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$IFACE}" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$IFACE}"
    export HOROVOD_GLOO_IFACE="${HOROVOD_GLOO_IFACE:-$IFACE}"
    export OMPI_MCA_btl_tcp_if_include="${OMPI_MCA_btl_tcp_if_include:-$IFACE}"   # Open MPI's own traffic
    echo "launch: interface ${GLOO_SOCKET_IFNAME} (route to MASTER_ADDR=$MASTER_ADDR)" >&2
fi

# Open MPI refuses to run as root without this flag.
MPIRUN_ROOT_FLAG=()
[[ "$(id -u)" == 0 ]] && MPIRUN_ROOT_FLAG=(--allow-run-as-root)

# write_hostfile: "host slots=N" per node into $HOSTFILE (default: a per-job file under $TMPDIR), written
# whole and renamed into place, so that nodes sharing a file system never read a half-written one.
write_hostfile() {
    HOSTFILE="${HOSTFILE:-${TMPDIR:-/tmp}/scaling_plugins.${SLURM_JOB_ID:-${PBS_JOBID:-$$}}.hostfile}"
    for i in "${!HOSTS[@]}"; do echo "${HOSTS[$i]} slots=${SLOTS[$i]}"; done > "$HOSTFILE.$$"
    mv -f "$HOSTFILE.$$" "$HOSTFILE"
    echo "launch: $BATCH_SYSTEM, $NNODES node(s), $NP rank(s); hostfile $HOSTFILE" >&2
}

# require_uniform_slots LAUNCHER: refuse an allocation whose ranks per node differ (LAUNCHER starts the same
# number of ranks on every node).
require_uniform_slots() {
    local slots
    for slots in "${SLOTS[@]}"; do
        [[ "$slots" == "${SLOTS[0]}" ]] || die "$1 starts the same number of ranks on every node, but this" \
            "allocation has ${SLOTS[*]} (SLURM_TASKS_PER_NODE=${SLURM_TASKS_PER_NODE:-}); ask for" \
            "--ntasks-per-node=N, set NPROC_PER_NODE, or use launch/mpirun.sh"
    done
}

# check_hosts_answer: every other node answers ssh within SSH_TIMEOUT seconds (default 10), before a
# launcher that goes over ssh waits on it; the nodes that do not are named.
check_hosts_answer() {
    [[ "${DRY_RUN:-0}" == 1 ]] && return 0
    local host silent=() pids=() me
    me="$(hostname)"
    for host in "${HOSTS[@]}"; do
        [[ "$host" == "$me" || "$host" == localhost || "$host" == 127.0.0.1 ]] && continue
        ssh -o BatchMode=yes -o ConnectTimeout="${SSH_TIMEOUT:-10}" "$host" true </dev/null >/dev/null 2>&1 &
        pids+=("$!:$host")
    done
    for entry in "${pids[@]}"; do wait "${entry%%:*}" || silent+=("${entry#*:}"); done
    [[ ${#silent[@]} -eq 0 ]] || die "node(s) ${silent[*]} did not answer ssh within ${SSH_TIMEOUT:-10} s" \
        "(down, unreachable, or no ssh key); this launcher starts its ranks over ssh"
}

# once_per_node SCRIPT ARGS...: run SCRIPT once on every node, with SCALING_PLUGINS_ON_NODE=1 and the node
# rank in SLURM_NODEID (srun) or the MPI rank (PBS: mpirun, one process per node). Under SLURM the task
# count is given explicitly: a nested srun otherwise inherits the job's (--ntasks-per-node of the job).
once_per_node() {
    export SCALING_PLUGINS_ON_NODE=1 NPROC_PER_NODE
    case "$BATCH_SYSTEM" in
        slurm)
            run_launcher srun --nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "$@" ;;
        pbs)   # the other nodes see neither PBS_NODEFILE nor this hostfile: the node list travels as a variable
            write_hostfile
            check_hosts_answer
            SCALING_PLUGINS_NODES="$(for i in "${!HOSTS[@]}"; do echo "${HOSTS[$i]}:${SLOTS[$i]}"; done | paste -sd,)"
            export SCALING_PLUGINS_NODES
            run_launcher mpirun -np "$NNODES" --hostfile "$HOSTFILE" --map-by ppr:1:node "${MPIRUN_ROOT_FLAG[@]}" \
                -x SCALING_PLUGINS_ON_NODE -x SCALING_PLUGINS_NODES -x NPROC_PER_NODE -x MASTER_ADDR -x MASTER_PORT -x GLOO_SOCKET_IFNAME \
                -x NCCL_SOCKET_IFNAME -x HOROVOD_GLOO_IFACE "$@" ;;
        *) die "once_per_node needs a batch system" ;;
    esac
}

# require_free_master_port: on the node that opens the rendezvous (node rank 0, where MASTER_ADDR is one of this
# host's addresses), refuse a MASTER_PORT something already listens on, before the launcher fails on it with a
# raw EADDRINUSE traceback. Elsewhere (another node, a dry run) nothing is checked.
require_free_master_port() {
    [[ "${DRY_RUN:-0}" == 1 || "$NODE_RANK" != 0 ]] && return 0
    local status=0
    "$PYTHON" - "$MASTER_ADDR" "$MASTER_PORT" <<'PY' || status=$?
import errno, socket, sys
addr, port = sys.argv[1], sys.argv[2]
try:                                     # not a port, or no IPv4 address here: the launcher says so itself
    port = int(port) if port.isdigit() and 0 < int(port) < 65536 else sys.exit(0)
    local = socket.getaddrinfo(addr, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
except (OSError, IndexError):
    sys.exit(0)
for where in (local, "0.0.0.0"):         # MASTER_ADDR must be this host's; the store listens on every address
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as torch's store: TIME_WAIT is no conflict
        try:
            sock.bind((where, port))
        except OSError as err:
            sys.exit(3 if err.errno == errno.EADDRINUSE else 0)   # EADDRNOTAVAIL: another host's address
PY
    [[ "$status" != 3 ]] || die "MASTER_PORT=$MASTER_PORT is in use on $MASTER_ADDR (another job, or a process" \
        "left over from an earlier run, listens there): set MASTER_PORT to a free port (without a batch system," \
        "leaving it unset picks a free one)"
}

# run_launcher CMD...: print the command (as "+ CMD", each word shell-quoted, so that it can be pasted back) and
# run it, unless DRY_RUN=1.
run_launcher() {
    local quoted
    printf -v quoted '%q ' "$@"
    echo "+ ${quoted% }" >&2
    [[ "${DRY_RUN:-0}" == 1 ]] && exit 0
    exec "$@"
}
