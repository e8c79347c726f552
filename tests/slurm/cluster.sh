#!/bin/bash
# A real one-node Slurm cluster on localhost, for testing profiles/slurm (never for production).
#
#   tests/slurm/cluster.sh start    install slurm-wlm + munge with apt if missing, write the config,
#                                   start munged, slurmctld, slurmd; wait until the node is idle
#   tests/slurm/cluster.sh stop     stop the daemons this script started (by pid), nothing else
#   tests/slurm/cluster.sh status   daemons and node state; exit 0 only if the node is usable
#   tests/slurm/cluster.sh env      print `export SLURM_CONF=...` for sbatch/squeue/snakemake
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
            exec sudo -n --preserve-env=SORAFLOW_SLURM_DIR,SORAFLOW_SLURMCTLD_PORT,SORAFLOW_SLURMD_PORT "$0" "$@"
        fi
        log "needs root (or passwordless sudo) to install and run slurm"; exit 2
    fi
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
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

case ${1:-} in
    start) start "$@" ;;
    stop) stop "$@" ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
