#!/usr/bin/env bash
# Stop what cluster/local/start-slurm.sh started: cancel jobs, stop slurmd, slurmctld, slurmdbd,
# MariaDB and munged. Leaves the packages and the accounting database in place.
set -u
scancel --user=root >/dev/null 2>&1 || true
for d in slurmd slurmctld slurmdbd; do pkill -x "$d" 2>/dev/null; done
for _ in $(seq 40); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x slurmdbd >/dev/null || break; sleep 0.25; done
for d in slurmd slurmctld slurmdbd; do pkill -9 -x "$d" 2>/dev/null; done  # what did not stop in 10 s
mariadb-admin --socket=/run/mysqld/mysqld.sock shutdown >/dev/null 2>&1 || pkill -x mariadbd 2>/dev/null
pkill -x munged 2>/dev/null
# wait until they are gone: a start right after must not find a dying munged and skip starting one
for _ in $(seq 40); do pgrep -x munged >/dev/null || pgrep -x mariadbd >/dev/null || break; sleep 0.25; done
exit 0
