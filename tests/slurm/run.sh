#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine: install Debian's slurm + munge, start the
# daemons, run a small study through `--workflow-profile profiles/slurm`, check that every
# cluster job went through sbatch and that the tables equal a local `--cores 2` run of the
# same config, check the GPU request of the generated submissions, then stop what it started.
# Needs root and apt (Debian/Ubuntu). Stops itself after 15 minutes; cleans up on any exit.
set -euo pipefail
[[ -z "${TLMAT_SLURM_DEADLINE:-}" ]] && exec env TLMAT_SLURM_DEADLINE=1 timeout -k 10 900 "$0" "$@"

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PY")"
WORK="$(mktemp -d /tmp/tlmat-slurm.XXXXXX)"
PIDS=()
CONFS=(slurm.conf gres.conf)   # written to /etc/slurm, any existing ones put back on exit
CONFS_TAKEN=0                  # set once they are backed up: before that, cleanup leaves them
log() { echo "[slurm-test $(date +%T)] $*"; }

cleanup() {
  local code=$?
  # snakemake (and its job steps) started from the work dir, then the daemons
  local mine=()
  for pid in $(pgrep -f snakemake || true); do
    [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$WORK"* ]] && mine+=("$pid")
  done
  for pid in "${mine[@]}" "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${mine[@]}" "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  if [[ $code -ne 0 && -d "$WORK" ]]; then
    log "FAILED (exit $code); daemon logs:"
    tail -n 20 "$WORK"/state/*.log 2>/dev/null || true
  fi
  if [[ $CONFS_TAKEN -eq 1 ]]; then
    for name in "${CONFS[@]}"; do
      if [[ -e "$WORK/$name.orig" ]]; then cp -p "$WORK/$name.orig" "/etc/slurm/$name";
      else rm -f "/etc/slurm/$name"; fi
    done
  fi
  rm -rf "$WORK"
  exit $code
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # timeout/ctrl-c: exit through cleanup

log "installing slurm and munge (apt)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

HOST="$(hostname -s)"
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
mkdir -p "$WORK/state/spool" "$WORK/state/ctld" "$WORK/munge"
# srun inside the jobs reads the default location (SLURM_CONF does not reach job steps):
# write /etc/slurm/slurm.conf, keeping any existing one to put back on exit
CONF=/etc/slurm/slurm.conf
mkdir -p /etc/slurm
for name in "${CONFS[@]}"; do
  if [[ -e "/etc/slurm/$name" ]]; then cp -p "/etc/slurm/$name" "$WORK/$name.orig"; fi
done
CONFS_TAKEN=1
# one GPU declared as a generic resource (no device behind it: nothing here asks for it but
# the `sbatch --test-only` check of the GPU submissions below)
printf "AutoDetect=off\nNodeName=$HOST Name=gpu File=/dev/null Count=1\n" >/etc/slurm/gres.conf
cat >"$CONF" <<CONF
ClusterName=tlmat
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
MinJobAge=86400
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$WORK/state/ctld
SlurmdSpoolDir=$WORK/state/spool
SlurmctldPidFile=$WORK/state/slurmctld.pid
SlurmdPidFile=$WORK/state/slurmd.pid
SlurmctldLogFile=$WORK/state/slurmctld.log
SlurmdLogFile=$WORK/state/slurmd.log
NodeName=$HOST CPUs=2 RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$CONF"

log "starting munged, slurmctld, slurmd"
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$WORK/munge/munge.key"
MUNGE_SOCKET=/run/munge/munge.socket.2
mkdir -p /run/munge
munged --foreground --force --key-file="$WORK/munge/munge.key" --socket="$MUNGE_SOCKET" \
  --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/state/munged.log" \
  --seed-file="$WORK/munge/seed" >"$WORK/state/munged.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [[ -S "$MUNGE_SOCKET" ]] && break; sleep 0.1; done
slurmctld -D -f "$CONF" >"$WORK/state/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D -f "$CONF" >"$WORK/state/slurmd.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do
  state="$(sinfo -h -N -o %t 2>/dev/null || true)"
  [[ "$state" == "idle" ]] && break
  sleep 1
done
[[ "$state" == "idle" ]] || { log "node never became idle (state: '$state')"; exit 1; }
log "cluster up: $(sinfo -h -o '%P %D %t %c')"

log "preparing a small study (synthetic crystals)"
cd "$WORK"
"$PY" "$ROOT/tests/slurm/study.py" setup "$WORK/cluster" "$WORK/local"
export PATH="$BIN:$PATH"
SNAKE=("$BIN/snakemake" --snakefile "$ROOT/Snakefile" --configfile tiny.yaml)

log "running it through SLURM (profiles/slurm, CPU-only: --resources gpu=0)"
# the profile's allocations are sized for real clusters (32 GB, 4 CPUs for pre-training);
# this node has 2 CPUs, so every job asks for 1 CPU and 1 GB here
(cd "$WORK/cluster" && "${SNAKE[@]}" --workflow-profile "$ROOT/profiles/slurm" \
  --resources gpu=0 --slurm-status-command squeue --slurm-init-seconds-before-status-checks 5 \
  --default-resources mem_mb=1000 runtime=30 cpus_per_task=1 --set-resources prepare:mem_mb=1000 \
  --set-threads pretrain=1 --cores 2 --jobs 4 >"$WORK/cluster.log" 2>&1) || { tail -n 60 "$WORK/cluster.log"; exit 1; }

log "running the same config locally (--cores 2)"
(cd "$WORK/local" && "${SNAKE[@]}" --workflow-profile "$ROOT/profiles/default" --cores 2 \
  >"$WORK/local.log" 2>&1) || { tail -n 60 "$WORK/local.log"; exit 1; }

log "checking sbatch submissions and tables"
"$PY" "$ROOT/tests/slurm/study.py" check "$WORK/cluster" "$WORK/local" "$WORK/cluster.log"

log "GPU request of the training rules (sbatch --test-only on the generated submission)"
mkdir -p "$WORK/shim"
cat >"$WORK/shim/sbatch" <<'SHIM'
#!/usr/bin/env bash
# record the submission, validate it with --test-only, refuse to queue it
echo "$*" >>"$SBATCH_RECORD"
/usr/bin/sbatch --test-only "$@" >>"$SBATCH_RECORD.test" 2>&1 || true
exit 1
SHIM
chmod +x "$WORK/shim/sbatch"
export SBATCH_RECORD="$WORK/gpu-submissions.txt"
(cd "$WORK/cluster" && PATH="$WORK/shim:$PATH" "${SNAKE[@]}" --workflow-profile "$ROOT/profiles/slurm" \
  --forcerun pretrain --until pretrain --retries 0 --jobs 1 --slurm-status-command squeue \
  --default-resources mem_mb=1000 runtime=30 cpus_per_task=1 --set-resources pretrain:mem_mb=1000 \
  --set-threads pretrain=1 \
  >"$WORK/gpu.log" 2>&1) || true
grep -q -- "--gpus=1\|--gres=gpu" "$SBATCH_RECORD" || {
  log "no GPU request in the pretrain submission:"; cat "$SBATCH_RECORD" || true; exit 1; }
grep -q "to start at" "$SBATCH_RECORD.test" || {
  log "sbatch --test-only refused the GPU submission:"; cat "$SBATCH_RECORD.test"; exit 1; }
log "pretrain submission: $(grep -o -- '--gpus=[0-9]*\|--gres=gpu[:0-9]*' "$SBATCH_RECORD" | head -1); test-only said: $(head -n 1 "$SBATCH_RECORD.test")"
log "OK"
