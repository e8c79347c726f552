#!/bin/bash
# A real Slurm cluster on this machine, for testing profiles/slurm (never for production): one node
# on localhost, or two nodes in network namespaces (`two-node`, see "two nodes in network namespaces").
#
#   tests/slurm/cluster.sh start    install slurm-wlm + munge with apt if missing, write the config,
#                                   start munged, slurmctld, slurmd; wait until the node is idle
#   tests/slurm/cluster.sh stop     stop the daemons this script started (by pid), nothing else
#   tests/slurm/cluster.sh status   daemons and node state; exit 0 only if the node is usable
#   tests/slurm/cluster.sh env      print `export SLURM_CONF=...` for sbatch/squeue/snakemake
#
#   tests/slurm/cluster.sh two-node install|start|stop|status
#                                   two nodes (node1, node2) and a controller, each in its own
#                                   network namespace, on this one machine
#   tests/slurm/cluster.sh two-node exec CMD [ARG...]
#                                   run a Slurm client (sbatch, squeue, snakemake) in the
#                                   controller's namespace, where the cluster's config is at
#                                   /etc/slurm and node1/node2 resolve
#
# Everything lives under $SORAFLOW_SLURM_DIR (default /tmp/soraflow-slurm): slurm.conf,
# gres.conf, state, spool, logs and pid files. /etc/slurm/slurm.conf and gres.conf become
# symlinks to them (and are removed by `stop`): the Slurm executor plugin strips SLURM_* variables,
# SLURM_CONF included, before the `srun` inside each job, so the config must be at the default
# path. A slurm.conf there that is not such a symlink is never overwritten: start fails instead.
# munged is the system one (/etc/munge/munge.key, /run/munge); it is started only if none answers,
# and then stopped again by `stop`.
#
# The node has two fake GPUs: gres.conf File= entries are symlinks to /dev/null. Slurm drops
# GPUs without a device file and drains the node ("gres/gpu count reported lower"), so the files
# must exist. Jobs still get CUDA_VISIBLE_DEVICES set as on a real GPU node.
# No accounting (no slurmdbd): snakemake-executor-plugin-slurm must use `--slurm-status-command
# squeue`, which only works while finished jobs stay visible, hence MinJobAge=600.
# Needs root (apt, daemons); re-runs itself with `sudo -n` when not root.
set -euo pipefail

DIR=${SORAFLOW_SLURM_DIR:-/tmp/soraflow-slurm}
CONF=$DIR/slurm.conf
FAKEGPU=$DIR/fakegpu
CTLD_PORT=${SORAFLOW_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SORAFLOW_SLURMD_PORT:-6818}
export SLURM_CONF=$CONF

log() { echo "cluster.sh: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            exec sudo -n --preserve-env=SORAFLOW_SLURM_DIR,SORAFLOW_SLURMCTLD_PORT,SORAFLOW_SLURMD_PORT,SORAFLOW_SLURM2_DIR,SORAFLOW_SLURM2_NS "$0" "$@"
        fi
        log "needs root (or passwordless sudo) to install and run slurm"; exit 2
    fi
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {  # two-node: also ip and nsenter
    local missing=()
    if [ "${1:-}" = two-node ]; then
        command -v ip >/dev/null || missing+=(iproute2)
        command -v nsenter >/dev/null || missing+=(util-linux)
    fi
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]} with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    mkdir -p "$DIR"/{state,spool,log,run} "$FAKEGPU"
    ln -sfn /dev/null "$FAKEGPU/nvidia0"
    ln -sfn /dev/null "$FAKEGPU/nvidia1"
    # What slurmd sees on this machine: a node definition larger than the machine drains it.
    local hw cpus sockets cores threads mem
    hw=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
    cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
    threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$((mem * 8 / 10))
    local defmem=$((mem / cpus / 2))
    cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster on localhost (not for production).
ClusterName=soraflowtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, CR_Core_Memory gives every job the whole node's memory.
DefMemPerCPU=$defmem
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# No accounting: squeue is the only job status source, so finished jobs must stay listed
# long enough for snakemake-executor-plugin-slurm to see how they ended.
MinJobAge=600
# Time between SIGTERM and SIGKILL at a time limit or scancel: room for a checkpoint.
KillWait=30
InactiveLimit=0
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
PartitionName=debug Nodes=localhost MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/gres.conf" <<EOF
# Two fake GPUs: device files must exist or Slurm drops the GPUs and drains the node.
Name=gpu File=$FAKEGPU/nvidia[0-1]
EOF
    mkdir -p /etc/slurm
    local name
    for name in slurm.conf gres.conf; do
        ln -sfn "$DIR/$name" "/etc/slurm/$name"
    done
}

etc_is_ours() {  # /etc/slurm/{slurm,gres}.conf absent, or symlinks into $DIR
    local name target
    for name in slurm.conf gres.conf; do
        [ -e "/etc/slurm/$name" ] || [ -L "/etc/slurm/$name" ] || continue
        target=$(readlink "/etc/slurm/$name" || true)
        [ "$target" = "$DIR/$name" ] || return 1
    done
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_ok && return 0
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey -c -f
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 50); do munge_ok && break; sleep 0.1; done
    munge_ok || { log "munged did not start"; exit 1; }
    cp /run/munge/munged.pid "$DIR/run/munged.pid"  # ours: stop it again
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -1; }

start() {
    need_root "$@"
    if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && [ "$(node_state)" = idle ]; then
        log "already running"; status; return 0
    fi
    install_packages
    if ! etc_is_ours; then
        log "/etc/slurm/slurm.conf or gres.conf exists and is not ours: not overwriting a real cluster's config"
        exit 1
    fi
    stop_daemons quiet
    write_config
    start_munge
    # -c: a fresh state each start (no stale drained node, job ids from 1).
    slurmctld -c -f "$CONF"
    slurmd -N localhost -f "$CONF"
    local state=""
    for _ in $(seq 1 120); do
        state=$(node_state)
        case $state in
            idle) log "node idle (SLURM_CONF=$CONF)"; return 0 ;;
            drain*|down*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    log "node not idle after 60 s: $state"; sinfo -R >&2 || true
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    exit 1
}

stop_daemons() {
    local f pid
    for f in "$DIR/run/slurmd.pid" "$DIR/run/slurmctld.pid" "$DIR/run/munged.pid"; do
        if alive "$f"; then
            pid=$(cat "$f")
            kill "$pid"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            [ "${1:-}" = quiet ] || log "stopped $(basename "$f" .pid) ($pid)"
        fi
        rm -f "$f"
    done
}

stop() {
    need_root "$@"
    stop_daemons
    if etc_is_ours; then rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf; fi
}

status() {
    local f ok=0
    for f in slurmctld slurmd munged; do
        if alive "$DIR/run/$f.pid"; then echo "$f: running ($(cat "$DIR/run/$f.pid"))"
        elif [ $f = munged ] && munge_ok; then echo "munged: running (not started by this script)"
        else echo "$f: not running"; [ $f = munged ] || ok=1; fi
    done
    echo "node: $(node_state || true)"
    [ "$(node_state)" = idle ] || [ "$(node_state)" = mixed ] || [ "$(node_state)" = allocated ] || ok=1
    echo "SLURM_CONF=$CONF"
    return $ok
}

# --- two nodes in network namespaces ----------------------------------------------------------
# `two-node start`: namespaces ${NS}net (a bridge, no address), ${NS}ctl (munged + slurmctld,
# 10.77.0.1, hostname ctl), ${NS}n1 and ${NS}n2 (slurmd node1 at 10.77.0.11, node2 at 10.77.0.12).
# Each veth is created between two of these namespaces, so the root namespace holds no end and
# gains no address. Every daemon also gets its own UTS namespace (its hostname) and mount
# namespace, in which $DIR2/etc is bind-mounted over /etc/slurm (jobs find slurm.conf at the
# default path: the executor plugin drops SLURM_CONF) and $DIR2/etc/hosts over /etc/hosts (node1,
# node2 and ctl resolve, for torchrun's rendezvous); the real /etc is untouched. Daemons are
# entered with nsenter, not `ip netns exec`, which remounts /sys and hides /sys/fs/cgroup
# (slurmd 22.05 then aborts: "Unable to initialize cgroup plugin"). munged is a private one in
# ctl, its socket under $DIR2 (AuthInfo in slurm.conf), its key made for this cluster.
# `two-node exec` runs a client the same way in ctl (no hostname of its own). `two-node stop`
# cancels the jobs, ends every process left in the four namespaces (all started by this script
# or its clients) and deletes the namespaces, which takes their veths and bridge with them.
DIR2=${SORAFLOW_SLURM2_DIR:-/tmp/soraflow-slurm2}
NS=${SORAFLOW_SLURM2_NS:-soraflow-}
declare -A ADDR2=([ctl]=10.77.0.1 [n1]=10.77.0.11 [n2]=10.77.0.12)

ns_exists() { [ -e "/run/netns/$NS$1" ]; }

# Run "$@" inside namespace $1 (net), a new mount namespace with the cluster's /etc/slurm and
# /etc/hosts, and, when $2 is not empty, a new UTS namespace with hostname $2.
in_ns() {
    local net=$1 host=$2
    shift 2
    local uts=() sethost=:
    if [ -n "$host" ]; then uts=(--uts); sethost="hostname $host"; fi
    nsenter --net="/run/netns/$NS$net" unshare --mount "${uts[@]}" sh -c \
        "mount --bind '$DIR2/etc' /etc/slurm && mount --bind '$DIR2/etc/hosts' /etc/hosts && $sethost && unset SLURM_CONF && exec \"\$@\"" \
        sh "$@"
}

two_write_config() {
    rm -rf "$DIR2"/{run,state,spool}
    mkdir -p "$DIR2"/{etc,run,state,log,fakegpu} "$DIR2"/spool/{node1,node2}
    install -d -o munge -g munge -m 0755 "$DIR2/munge"  # munged wants its socket's folder searchable
    ln -sfn /dev/null "$DIR2/fakegpu/nvidia0"
    ln -sfn /dev/null "$DIR2/fakegpu/nvidia1"
    if [ ! -s "$DIR2/munge/munge.key" ]; then
        mungekey -c -f -k "$DIR2/munge/munge.key"
        chown munge:munge "$DIR2/munge/munge.key"
        chmod 400 "$DIR2/munge/munge.key"
    fi
    # Both nodes share this machine's cores; each is declared with all of them (what slurmd
    # detects) and half of 80% of its memory.
    local hw cpus sockets cores threads mem
    hw=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    sockets=$(sed -n 's/.* SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
    cores=$(sed -n 's/.* CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
    threads=$(sed -n 's/.* ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$((mem * 4 / 10))
    local node_hw="CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:2"
    cat >"$DIR2/etc/slurm.conf" <<EOC
# Written by tests/slurm/cluster.sh two-node: a two-node test cluster in network namespaces.
ClusterName=soraflowtest2
SlurmctldHost=ctl(${ADDR2[ctl]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR2/munge/munge.socket
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, CR_Core_Memory gives every job the whole node's memory.
DefMemPerCPU=$((mem / cpus / 2))
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
StateSaveLocation=$DIR2/state
SlurmdSpoolDir=$DIR2/spool/%n
SlurmctldPidFile=$DIR2/run/slurmctld.pid
SlurmdPidFile=$DIR2/run/slurmd-%n.pid
SlurmctldLogFile=$DIR2/log/slurmctld.log
SlurmdLogFile=$DIR2/log/slurmd-%n.log
# No accounting: squeue is the only job status source (see the one-node config).
MinJobAge=600
KillWait=30
InactiveLimit=0
JobRequeue=1
MailProg=/bin/true
GresTypes=gpu
NodeName=node1 NodeAddr=${ADDR2[n1]} $node_hw State=UNKNOWN
NodeName=node2 NodeAddr=${ADDR2[n2]} $node_hw State=UNKNOWN
PartitionName=cpu Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=node[1-2] MaxTime=INFINITE State=UP
PartitionName=debug Nodes=node[1-2] MaxTime=INFINITE State=UP
EOC
    cat >"$DIR2/etc/gres.conf" <<EOC
# Two fake GPUs per node: device files must exist or Slurm drops the GPUs and drains the node.
NodeName=node[1-2] Name=gpu File=$DIR2/fakegpu/nvidia[0-1]
EOC
    cat >"$DIR2/etc/hosts" <<EOC
127.0.0.1 localhost
${ADDR2[ctl]} ctl
${ADDR2[n1]} node1
${ADDR2[n2]} node2
EOC
}

two_network() {
    local ns
    for ns in net ctl n1 n2; do
        ip netns add "$NS$ns"
        ip -n "$NS$ns" link set lo up
    done
    ip -n "${NS}net" link add br0 type bridge
    ip -n "${NS}net" link set br0 up
    for ns in ctl n1 n2; do
        # both ends made inside our namespaces: the root namespace never holds one
        ip -n "${NS}net" link add "p-$ns" type veth peer name v0 netns "$NS$ns"
        ip -n "${NS}net" link set "p-$ns" master br0 up
        ip -n "$NS$ns" addr add "${ADDR2[$ns]}/24" dev v0
        ip -n "$NS$ns" link set v0 up
    done
}

client() { in_ns ctl "" "$@"; }

nodes_state() { client sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true; }

two_start() {
    local ns
    for ns in net ctl n1 n2; do
        if ns_exists "$ns"; then log "namespace $NS$ns exists: run '$0 two-node stop' first"; exit 1; fi
    done
    trap 'code=$?; [ $code = 0 ] || { log "start failed: tearing down"; two_stop; }; exit $code' EXIT
    install_packages two-node
    [ -d /etc/slurm ] || mkdir -p /etc/slurm  # the bind-mount target (slurm-wlm makes it)
    two_write_config
    two_network
    nsenter --net="/run/netns/${NS}ctl" runuser -u munge -- /usr/sbin/munged \
        --socket="$DIR2/munge/munge.socket" --pid-file="$DIR2/munge/munged.pid" \
        --log-file="$DIR2/munge/munged.log" --seed-file="$DIR2/munge/munged.seed" \
        --key-file="$DIR2/munge/munge.key"
    for _ in $(seq 1 100); do [ -S "$DIR2/munge/munge.socket" ] && break; sleep 0.1; done
    munge -n -S "$DIR2/munge/munge.socket" | unmunge -S "$DIR2/munge/munge.socket" >/dev/null || {
        log "munged did not start"; cat "$DIR2/munge/munged.log" >&2; exit 1; }
    in_ns ctl ctl /usr/sbin/slurmctld -c
    in_ns n1 node1 /usr/sbin/slurmd -N node1
    in_ns n2 node2 /usr/sbin/slurmd -N node2
    local state=""
    for _ in $(seq 1 300); do
        state=$(nodes_state)
        [ "$state" = "node1=idle node2=idle " ] && { log "nodes idle: $state"; return 0; }
        sleep 0.2
    done
    log "nodes not idle after 60 s: '$state'"
    tail -n 20 "$DIR2"/log/*.log >&2 || true
    exit 1
}

ns_pids() {
    local ns
    for ns in n1 n2 ctl net; do ns_exists "$ns" && ip netns pids "$NS$ns"; done 2>/dev/null | sort -u
}

two_stop() {
    if ns_exists ctl && [ -S "$DIR2/munge/munge.socket" ]; then
        # jobs first, so their processes end through Slurm
        client timeout 10 scancel --quiet --user=root 2>/dev/null || true
        for _ in $(seq 1 25); do
            [ -z "$(client timeout 5 squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    # Every process left in our namespaces is one this script (or a client it ran) started.
    local pids
    pids=$(ns_pids | tr '\n' ' ')
    if [ -n "$pids" ]; then
        kill -TERM $pids 2>/dev/null || true
        for _ in $(seq 1 25); do [ -z "$(ns_pids)" ] && break; sleep 0.2; done
        pids=$(ns_pids | tr '\n' ' ')
        [ -n "$pids" ] && { log "SIGKILL to $pids"; kill -KILL $pids 2>/dev/null || true; sleep 0.5; }
    fi
    local ns
    for ns in n1 n2 ctl net; do ns_exists "$ns" && ip netns del "$NS$ns"; done  # takes its veths and bridge
    rm -rf "$DIR2"/{run,state,spool}
    log "two-node cluster stopped"
}

two_status() {
    local ns ok=0
    for ns in net ctl n1 n2; do ns_exists "$ns" || { echo "namespace $NS$ns: missing"; ok=1; }; done
    [ $ok = 0 ] || return 1
    local state
    state=$(nodes_state)
    echo "nodes: $state"
    [[ $state =~ ^node1=(idle|mix|alloc)\ node2=(idle|mix|alloc)\ $ ]]
}

case ${1:-} in
    start) start "$@" ;;
    stop) stop "$@" ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    two-node)
        case ${2:-} in
            install) need_root "$@"; install_packages two-node ;;
            start) need_root "$@"; two_start ;;
            stop) need_root "$@"; two_stop ;;
            status) need_root "$@"; two_status ;;
            exec) need_root "$@"; shift 2; client "$@" ;;
            *) echo "usage: $0 two-node install|start|stop|status|exec CMD [ARG...]" >&2; exit 2 ;;
        esac ;;
    *) echo "usage: $0 start|stop|status|env  or  $0 two-node install|start|stop|status|exec CMD [ARG...]" >&2; exit 2 ;;
esac
