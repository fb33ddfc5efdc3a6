#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, with accounting, for laptops and CI.
#
#   sudo slurm/local-cluster.sh up     # install if needed, configure, start, wait until idle
#   sudo slurm/local-cluster.sh down   # stop every daemon it started, by PID, in reverse order
#   slurm/local-cluster.sh status
#
# Debian's packages (slurmctld slurmd slurm-client munge slurmdbd mariadb-server), daemons
# started without systemd.  The daemons are machine-wide: run `up`, the work and `down`
# inside one `flock /tmp/ragbench-slurm.lock ...` when several people share the machine.
# A fake GPU (gres gpu:a6000:1 on /dev/null) makes `--gres=gpu:a6000:1` schedule as on a
# GPU cluster.  Refuses to touch an /etc/slurm/slurm.conf that it did not write.
set -euo pipefail

STATE=${RAGBENCH_SLURM_STATE:-/var/lib/ragbench-slurm}
CONF_DIR=/etc/slurm
MARK="# written by ragbench slurm/local-cluster.sh"
CLUSTER=ragbench
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DB_PASS=ragbench-local

log() { echo "local-cluster: $*" >&2; }
die() { log "$*"; exit 1; }

# Poll `$@` until it succeeds, at most $1 seconds.
wait_for() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready within ${limit} s (logs under $STATE/log)"
    sleep 0.5
  done
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's maintainer scripts would start the daemons through init: forbid that here.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' RETURN
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
  if [[ -f $CONF_DIR/slurm.conf ]] && ! grep -qF "$MARK" "$CONF_DIR/slurm.conf"; then
    die "$CONF_DIR/slurm.conf exists and was not written by this script; not touching it"
  fi
  mkdir -p "$CONF_DIR" "$STATE"/{ctld,slurmd,log,run,mysql}
  local host node
  host=$(hostname -s)
  # The node line as slurmd sees this machine (RealMemory may not exceed what is there).
  node=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+/NodeName=$host NodeAddr=127.0.0.1/")
  cat >"$CONF_DIR/slurm.conf" <<CONF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
KillWait=5
ReturnToService=2
GresTypes=gpu
$node Gres=gpu:a6000:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  cat >"$CONF_DIR/gres.conf" <<CONF
$MARK
AutoDetect=off
Name=gpu Type=a6000 File=/dev/null
CONF
  cat >"$CONF_DIR/slurmdbd.conf" <<CONF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
CONF
  chmod 600 "$CONF_DIR/slurmdbd.conf"
}

running() { [[ -f $STATE/run/$1.pid ]] && kill -0 "$(cat "$STATE/run/$1.pid")" 2>/dev/null; }

# Start a daemon in the foreground of a new session, its output to a log, its PID kept.
start() {
  local name=$1; shift
  running "$name" && { log "$name already running"; return; }
  (
    # Close inherited descriptors (a caller's `flock` lock among them): a daemon must not
    # hold the lock for the rest of its life.
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      ((fd > 2)) && eval "exec $fd>&-" 2>/dev/null
    done
    exec setsid "$@" >>"$STATE/log/$name.out" 2>&1 </dev/null
  ) &
  echo $! >"$STATE/run/$name.pid"
}

start_munge() {
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
  wait_for 20 munged bash -c 'munge -n | unmunge'
}

start_accounting() {
  install -d -o mysql -g mysql /run/mysqld
  [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  start mariadbd /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --skip-networking \
    --socket=/run/mysqld/mysqld.sock --pid-file=/run/mysqld/mysqld.pid
  wait_for 60 mariadbd mariadb -e 'SELECT 1'
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  start slurmdbd /usr/sbin/slurmdbd -D
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
}

# Up and taking jobs (idle, or already running some): not down, drained or unknown.
node_up() { sinfo -h -N -o '%T' | grep -Eqx 'idle|mixed|allocated|completing'; }

up() {
  [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"
  local t0=$SECONDS
  trap '[[ -n ${UP_DONE:-} ]] || { log "start failed: stopping what was started"; down; }' EXIT
  install_packages
  write_config
  start_munge
  start_accounting
  start slurmctld /usr/sbin/slurmctld -D -i
  wait_for 60 slurmctld scontrol ping
  start slurmd /usr/sbin/slurmd -D
  wait_for 60 "the node" node_up
  UP_DONE=1
  log "up in $((SECONDS - t0)) s: $(sinfo -h -N -o '%N %T %c CPUs %m MB %G')"
}

stop() {
  local name=$1 pid
  [[ -f $STATE/run/$name.pid ]] || return 0
  pid=$(cat "$STATE/run/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$name did not stop in 10 s: SIGKILL"; kill -KILL "$pid"; }
  fi
  rm -f "$STATE/run/$name.pid"
}

down() {
  [[ $(id -u) == 0 ]] || die "run as root"
  # Jobs first, so that nothing they started outlives the cluster.
  if running slurmctld; then
    scancel --full --quiet --user=root 2>/dev/null || true
    scancel --full --quiet --state=PENDING 2>/dev/null || true
  fi
  for name in slurmd slurmctld slurmdbd mariadbd munged; do stop "$name"; done
  log "down"
}

status() {
  for name in munged mariadbd slurmdbd slurmctld slurmd; do
    if running "$name"; then echo "$name running (pid $(cat "$STATE/run/$name.pid"))"; else echo "$name stopped"; fi
  done
  running slurmctld && sinfo
  return 0
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
