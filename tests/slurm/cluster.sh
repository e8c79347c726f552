#!/bin/bash
# A real two-node Slurm cluster on this machine, for testing profiles/slurm (never for production):
# a controller and two nodes (node1, node2), each in its own network namespace.
#
#   tests/slurm/cluster.sh install   install slurm-wlm, munge, iproute2 with apt where missing
#   tests/slurm/cluster.sh start     write the config, make the namespaces, start munged, slurmctld
#                                    and both slurmd; wait until the nodes are idle
#   tests/slurm/cluster.sh stop      cancel the jobs, end every process in the namespaces, delete them
#   tests/slurm/cluster.sh status    nodes' state; exit 0 only if both are usable
#   tests/slurm/cluster.sh exec CMD [ARG...]
#                                    run a Slurm client (sbatch, squeue, snakemake) in the
#                                    controller's namespace, where the cluster's config is at
#                                    /etc/slurm and node1/node2 resolve
#
# Each node has two fake GPUs: gres.conf File= entries are symlinks to /dev/null. Slurm drops
# GPUs without a device file and drains the node ("gres/gpu count reported lower"), so the files
# must exist. Jobs still get CUDA_VISIBLE_DEVICES set as on a real GPU node.
# No accounting (no slurmdbd): snakemake-executor-plugin-slurm must use `--slurm-status-command
# squeue`, which only works while finished jobs stay visible, hence MinJobAge=600.
# Needs root (apt, daemons, namespaces); re-runs itself with `sudo -n` when not root.
set -euo pipefail

log() { echo "cluster.sh: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            exec sudo -n --preserve-env=SORAFLOW_SLURM_DIR,SORAFLOW_SLURM_NS "$0" "$@"
        fi
        log "needs root (or passwordless sudo) to install and run slurm"; exit 2
    fi
}

install_packages() {
    local missing=()
    command -v ip >/dev/null || missing+=(iproute2)
    command -v nsenter >/dev/null || missing+=(util-linux)
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

# `start`: namespaces ${NS}net (a bridge, no address), ${NS}ctl (munged + slurmctld,
# 10.77.0.1, hostname ctl), ${NS}n1 and ${NS}n2 (slurmd node1 at 10.77.0.11, node2 at 10.77.0.12).
# Each veth is created between two of these namespaces, so the root namespace holds no end and
# gains no address. Every daemon also gets its own UTS namespace (its hostname) and mount
# namespace, in which $DIR/etc is bind-mounted over /etc/slurm (jobs find slurm.conf at the
# default path: the executor plugin drops SLURM_CONF) and $DIR/etc/hosts over /etc/hosts (node1,
# node2 and ctl resolve, for torchrun's rendezvous); the real /etc is untouched. Daemons are
# entered with nsenter, not `ip netns exec`, which remounts /sys and hides /sys/fs/cgroup
# (slurmd 22.05 then aborts: "Unable to initialize cgroup plugin"). munged is a private one in
# ctl, its socket under $DIR (AuthInfo in slurm.conf), its key made for this cluster.
# `exec` runs a client the same way in ctl (no hostname of its own). `stop`
# cancels the jobs, ends every process left in the four namespaces (all started by this script
# or its clients) and deletes the namespaces, which takes their veths and bridge with them.
DIR=${SORAFLOW_SLURM_DIR:-/tmp/soraflow-slurm}
NS=${SORAFLOW_SLURM_NS:-soraflow-}
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
        "mount --bind '$DIR/etc' /etc/slurm && mount --bind '$DIR/etc/hosts' /etc/hosts && $sethost && unset SLURM_CONF && exec \"\$@\"" \
        sh "$@"
}

write_config() {
    rm -rf "$DIR"/{run,state,spool}
    mkdir -p "$DIR"/{etc,run,state,log,fakegpu} "$DIR"/spool/{node1,node2}
    install -d -o munge -g munge -m 0755 "$DIR/munge"  # munged wants its socket's folder searchable
    ln -sfn /dev/null "$DIR/fakegpu/nvidia0"
    ln -sfn /dev/null "$DIR/fakegpu/nvidia1"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        mungekey -c -f -k "$DIR/munge/munge.key"
        chown munge:munge "$DIR/munge/munge.key"
        chmod 400 "$DIR/munge/munge.key"
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
    cat >"$DIR/etc/slurm.conf" <<EOC
# Written by tests/slurm/cluster.sh: a two-node test cluster in network namespaces.
ClusterName=soraflowtest2
SlurmctldHost=ctl(${ADDR2[ctl]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
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
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No accounting: squeue is the only job status source, so finished jobs must stay listed
# long enough for snakemake-executor-plugin-slurm to see how they ended.
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
    cat >"$DIR/etc/gres.conf" <<EOC
# Two fake GPUs per node: device files must exist or Slurm drops the GPUs and drains the node.
NodeName=node[1-2] Name=gpu File=$DIR/fakegpu/nvidia[0-1]
EOC
    cat >"$DIR/etc/hosts" <<EOC
127.0.0.1 localhost
${ADDR2[ctl]} ctl
${ADDR2[n1]} node1
${ADDR2[n2]} node2
EOC
}

make_network() {
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

start_cluster() {
    local ns
    for ns in net ctl n1 n2; do
        if ns_exists "$ns"; then log "namespace $NS$ns exists: run '$0 stop' first"; exit 1; fi
    done
    trap 'code=$?; [ $code = 0 ] || { log "start failed: tearing down"; stop_cluster; }; exit $code' EXIT
    install_packages
    [ -d /etc/slurm ] || mkdir -p /etc/slurm  # the bind-mount target (slurm-wlm makes it)
    write_config
    make_network
    nsenter --net="/run/netns/${NS}ctl" runuser -u munge -- /usr/sbin/munged \
        --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
        --key-file="$DIR/munge/munge.key"
    for _ in $(seq 1 100); do [ -S "$DIR/munge/munge.socket" ] && break; sleep 0.1; done
    munge -n -S "$DIR/munge/munge.socket" | unmunge -S "$DIR/munge/munge.socket" >/dev/null || {
        log "munged did not start"; cat "$DIR/munge/munged.log" >&2; exit 1; }
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
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
}

ns_pids() {
    local ns
    for ns in n1 n2 ctl net; do ns_exists "$ns" && ip netns pids "$NS$ns"; done 2>/dev/null | sort -u
}

stop_cluster() {
    if ns_exists ctl && [ -S "$DIR/munge/munge.socket" ]; then
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
    rm -rf "$DIR"/{run,state,spool}
    log "cluster stopped"
}

cluster_status() {
    local ns ok=0
    for ns in net ctl n1 n2; do ns_exists "$ns" || { echo "namespace $NS$ns: missing"; ok=1; }; done
    [ $ok = 0 ] || return 1
    local state
    state=$(nodes_state)
    echo "nodes: $state"
    [[ $state =~ ^node1=(idle|mix|alloc)\ node2=(idle|mix|alloc)\ $ ]]
}

case ${1:-} in
    install) need_root "$@"; install_packages ;;
    start) need_root "$@"; start_cluster ;;
    stop) need_root "$@"; stop_cluster ;;
    status) need_root "$@"; cluster_status ;;
    exec) need_root "$@"; shift; client "$@" ;;
    *) echo "usage: $0 install|start|stop|status|exec CMD [ARG...]" >&2; exit 2 ;;
esac
