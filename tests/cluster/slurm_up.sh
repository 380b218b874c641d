#!/usr/bin/env bash
# Starts a one-node SLURM cluster on this host for the cluster tests, and prints
# `export SLURM_CONF=...` for the caller. Usage: slurm_up.sh STATE_DIR
#
# - installs slurm-wlm and munge from Debian's packages when they are missing
#   (root only; apt-get update first);
# - writes a minimal slurm.conf under STATE_DIR (one node with this host's cores and
#   name, one partition), so a real /etc/slurm configuration is never touched;
# - starts munged, slurmctld and slurmd, and waits until sinfo shows the node idle.
# slurm_down.sh STATE_DIR stops them again. Exit status 3: SLURM cannot be had here.
set -euo pipefail
STATE=$(realpath -m "${1:?usage: slurm_up.sh STATE_DIR}")
mkdir -p "$STATE"/ctld "$STATE"/d "$STATE"/munge
exec 3>&1 1>>"$STATE/up.log" 2>&1  # the log keeps apt's and the daemons' chatter

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "slurm-wlm and munge are not installed, and this is not a root Debian machine" >&3
    exit 3
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge || {
    echo "apt-get install slurm-wlm munge failed (see $STATE/up.log)" >&3
    exit 3
  }
fi

HOST=$(hostname -s)
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS, which a caller may have set to 1
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat >"$STATE/slurm.conf" <<CONF
ClusterName=hallucinate-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldPort=6917
SlurmdPort=6918
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$STATE/slurm.conf"

# munge: its own key and socket under STATE, so a running site munged is left alone
if [ ! -s "$STATE/munge/munge.key" ]; then
  dd if=/dev/urandom bs=1 count=1024 of="$STATE/munge/munge.key" 2>/dev/null
fi
chmod 700 "$STATE/munge"
chmod 400 "$STATE/munge/munge.key"
SOCKET=/run/munge/munge.socket.2  # where slurm's auth/munge looks
mkdir -p /run/munge
munged 3>&- --force --key-file="$STATE/munge/munge.key" --socket="$SOCKET" \
  --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/seed"

slurmctld -f "$SLURM_CONF" -i 3>&-
slurmd -f "$SLURM_CONF" 3>&-
for _ in $(seq 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -q '^idle'; then
    echo "export SLURM_CONF=$SLURM_CONF" >&3
    exit 0
  fi
  sleep 1
done
echo "the SLURM node did not come up idle in 60 s; sinfo says: $(sinfo 2>&1 | tr '\n' ' '); see $STATE" >&3
exit 1
