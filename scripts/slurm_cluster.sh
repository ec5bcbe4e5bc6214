#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (Debian's slurm-wlm + munge, loopback only), for tests marked
# `slurm` and for trying sweeps locally.
#
#   scripts/slurm_cluster.sh start    install slurm-wlm/munge if missing (root only), write the config, start
#                                     munged, slurmctld and slurmd, wait until the node is idle
#   scripts/slurm_cluster.sh stop     cancel the jobs, stop the daemons by the pids they wrote
#   scripts/slurm_cluster.sh status   daemons and sinfo; exit 0 only when the node answers
#   scripts/slurm_cluster.sh env      print `export SLURM_CONF=...` (use: eval "$(scripts/slurm_cluster.sh env)")
#
# Everything (config, munge key and socket, spool, state, logs, pid files) lives in $SLURM_STATE_DIR (default
# <repo>/.slurm, git-ignored); nothing under /etc is written, so client commands need SLURM_CONF (see `env`).
# Settings: SLURM_STATE_DIR, SLURM_CTLD_PORT (6817), SLURMD_PORT (6818), SLURM_NODE_CPUS (nproc),
# SLURM_NODE_MEM_MB (80% of MemTotal), SLURM_START_TIMEOUT (60 s).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${SLURM_STATE_DIR:-$REPO/.slurm}"
CONF="$STATE/slurm.conf"
MUNGE_DIR="$STATE/munge"
SOCKET="$MUNGE_DIR/munge.socket"
CTLD_PORT="${SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURMD_PORT:-6818}"
TIMEOUT="${SLURM_START_TIMEOUT:-60}"
NODE="$(hostname -s)"
export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "slurm_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

ensure_installed() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return
  fi
  [[ "$(id -u)" == 0 ]] || die "slurm-wlm and munge are not installed; run as root (it apt-get installs them) or
  install them yourself: apt-get install slurm-wlm munge"
  log "installing slurm-wlm and munge with apt-get"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
  local user cpus mem
  user="$(id -un)"
  # nproc honours OMP_NUM_THREADS (tests set it to 1): ask for the CPUs this process may use, whatever it says
  cpus="${SLURM_NODE_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
  mem="${SLURM_NODE_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)}"
  mkdir -p "$STATE"/{state,spool,log}
  cat > "$CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a one-node cluster on loopback.
ClusterName=datamatters
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# no cgroups in containers/VMs: track processes by /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
# requeue allowed (preemption/timeouts); short kill wait so a requeued/cancelled job ends fast
JobRequeue=1
KillWait=5
MinJobAge=60
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if pid_alive "$MUNGE_DIR/munged.pid"; then return; fi
  mkdir -p "$MUNGE_DIR"
  chmod 700 "$MUNGE_DIR"
  if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    chmod 400 "$MUNGE_DIR/munge.key"
  fi
  munged --force --socket="$SOCKET" --key-file="$MUNGE_DIR/munge.key" --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) st
  while ((SECONDS < deadline)); do
    st="$(node_state || true)"
    case "$st" in
      idle|mixed|allocated) return 0 ;;
      down*|drain*|drained*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  log "node $NODE not idle after ${TIMEOUT}s (state: ${st:-no answer}); logs in $STATE/log"
  tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  return 1
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  ensure_installed
  if status >/dev/null 2>&1; then log "already running (SLURM_CONF=$CONF)"; return 0; fi
  if ! pid_alive "$STATE/slurmctld.pid" && port_taken "$CTLD_PORT"; then
    die "port $CTLD_PORT is taken: another SLURM cluster (e.g. one started from another checkout) runs here.
  Stop it, or pick free ports: SLURM_CTLD_PORT=6917 SLURMD_PORT=6918 $0 start"
  fi
  write_config
  start_munge
  pid_alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF" -c
  pid_alive "$STATE/slurmd.pid" || slurmd -f "$CONF"
  wait_idle
  log "up: node $NODE idle, SLURM_CONF=$CONF"
}

stop_pids() {  # stop_pids PIDFILE...: TERM to all at once (each daemon takes ~2 s to exit), KILL after 10 s
  local file pid pids=()
  for file in "$@"; do  # read every pid first: a daemon may remove its own pid file as it exits
    pid="$(cat "$file" 2>/dev/null || true)"
    [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "pid $pid ignored TERM; killing"; kill -KILL "$pid" 2>/dev/null || true; }
  done
  rm -f "$@"
}

stop() {
  if pid_alive "$STATE/slurmctld.pid"; then
    scancel --full --quiet --user="$(id -un)" >/dev/null 2>&1 || true
    for _ in $(seq 30); do [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.5; done
  fi
  stop_pids "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$MUNGE_DIR/munged.pid"
  log "stopped"
}

status() {
  local ok=0 f
  for f in "$MUNGE_DIR/munged.pid" "$STATE/slurmctld.pid" "$STATE/slurmd.pid"; do
    if pid_alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): stopped"; ok=1; fi
  done
  ((ok == 0)) || return 1
  sinfo -N -o "%N %T %c %m" || return 1
  [[ -n "$(node_state)" ]]
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
