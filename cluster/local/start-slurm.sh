#!/usr/bin/env bash
# Bring up a single-node SLURM with accounting on 127.0.0.1, for tests (Debian 12, run as root).
#   bash cluster/local/start-slurm.sh      # idempotent; prints "slurm ready" when jobs can run
#   bash cluster/local/stop-slurm.sh       # stops every daemon this script started
# Two more slurmd daemons on the same host play the nodes vqn1 and vqn2 of the partition "multi"
# (Debian's slurmd is built with multiple-slurmd support: `slurmd -N <node>`), so jobs of two
# nodes (DDP across nodes) run for real. Installs munge, slurmctld, slurmd, slurm-client, slurmdbd and mariadb-server from Debian's
# packages when missing. Accounting (slurmdbd + a socket-only MariaDB) is required: submitit and
# Snakemake read job states with sacct. Two fake GPUs (character devices) back `--gpus-per-node`.
set -euo pipefail

STATE=${VQLP_SLURM_DIR:-/var/tmp/vqlp-slurm}
CLUSTER=vqlocal
HOST=$(hostname -s)
ACCOUNT=${VQLP_SLURM_ACCOUNT:-vqtest}

if [ "$(id -u)" -ne 0 ]; then echo "start-slurm.sh must run as root" >&2; exit 1; fi

need=()
for bin in munged slurmctld slurmd sbatch slurmdbd mariadbd; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing SLURM and MariaDB from Debian's packages (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client slurmdbd mariadb-server >/dev/null
fi

mkdir -p "$STATE"/{ctld,d,log,gres} /etc/slurm /run/munge /run/mysqld
[ -e "$STATE/gres/nvidia0" ] || mknod "$STATE/gres/nvidia0" c 195 0
[ -e "$STATE/gres/nvidia1" ] || mknod "$STATE/gres/nvidia1" c 195 1

# --- munge -------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

# --- MariaDB (socket only) ---------------------------------------------------------------------
chown mysql:mysql /run/mysqld
if ! pgrep -x mariadbd >/dev/null; then
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  (setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
     --log-error="$STATE/log/mariadb.log" >/dev/null 2>&1 &)
fi
for _ in $(seq 60); do mariadb -e "select 1" >/dev/null 2>&1 && break; sleep 0.5; done
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

# --- config ------------------------------------------------------------------------------------
NODE=$(slurmd -C | head -n 1 | sed -e "s/NodeName=[^ ]*/NodeName=$HOST/" -e 's/ UpTime=.*//')
MEM=$(echo "$NODE" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
NODE=$(echo "$NODE" | sed "s/RealMemory=[0-9]*/RealMemory=$((MEM * 9 / 10))/")
CORES=$(echo "$NODE" | grep -o "CPUs=.*ThreadsPerCore=[0-9]*")  # the two-node partition's nodes: the same cores
# the node names resolve (torch.distributed's rendezvous address is the first node's name)
for n in vqn1 vqn2; do grep -qE "[[:space:]]$n([[:space:]]|$)" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts; done

cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=sched_interval=5,bf_interval=5
MinJobAge=600
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$NODE Gres=gpu:2 NodeAddr=127.0.0.1 State=UNKNOWN
NodeName=vqn1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6831 $CORES RealMemory=4000 Gres=gpu:1 State=UNKNOWN
NodeName=vqn2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6832 $CORES RealMemory=4000 Gres=gpu:1 State=UNKNOWN
PartitionName=gpu Nodes=$HOST Default=YES MaxTime=2-00:00:00 State=UP
PartitionName=multi Nodes=vqn1,vqn2 Default=NO MaxTime=2-00:00:00 State=UP
CONF

cat > /etc/slurm/gres.conf <<CONF
AutoDetect=off
NodeName=$HOST Name=gpu File=$STATE/gres/nvidia[0-1]
NodeName=vqn1 Name=gpu File=$STATE/gres/nvidia0
NodeName=vqn2 Name=gpu File=$STATE/gres/nvidia1
CONF

# --- daemons -----------------------------------------------------------------------------------
pgrep -x slurmdbd >/dev/null || slurmdbd
for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
sacctmgr -i -Q add account "$ACCOUNT" cluster="$CLUSTER" >/dev/null 2>&1 || true
sacctmgr -i -Q add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null 2>&1 || true
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -fx "slurmd" >/dev/null || slurmd
for n in vqn1 vqn2; do pgrep -fx "slurmd -N $n" >/dev/null || slurmd -N "$n"; done
for _ in $(seq 120); do
  up=$(sinfo -h -N -o "%N %t" 2>/dev/null | grep -cE " (idle|mix|alloc)" || true)
  if [ "$up" -ge 3 ]; then echo "slurm ready (cluster $CLUSTER, partitions gpu and multi (2 nodes), account $ACCOUNT)"; exit 0; fi
  scontrol update nodename="$HOST,vqn1,vqn2" state=resume >/dev/null 2>&1 || true
  sleep 0.5
done
echo "slurm did not come up; logs in $STATE/log" >&2
sinfo >&2 || true
exit 1
