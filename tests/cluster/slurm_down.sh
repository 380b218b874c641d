#!/usr/bin/env bash
# Stops what slurm_up.sh STATE_DIR started: jobs, slurmd, slurmctld and munged.
STATE=$(realpath -m "${1:?usage: slurm_down.sh STATE_DIR}")
export SLURM_CONF="$STATE/slurm.conf"
scancel --user="$(id -un)" 2>/dev/null || true
for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
  [ -s "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
done
sleep 1
for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
  [ -s "$pid" ] && kill -9 "$(cat "$pid")" 2>/dev/null || true
done
exit 0
