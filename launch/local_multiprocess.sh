#!/usr/bin/env bash
# N `lmtrain train` processes on this machine, talking over localhost: the multi-host code path
# (one process per "host", each with its own CPU devices and its own shard of the data) without a
# cluster. tests/train/test_distributed.py runs this script.
#
#   launch/local_multiprocess.sh CONFIG [KEY=VALUE ...]
#   NUM_PROCESSES=4 DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh configs/demo.yaml workdir=runs/mp
#
# Output lines are prefixed with the process id. If a process fails, the others are stopped (they
# would wait for it) and the script exits with its status.
set -euo pipefail

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}   # CPU devices per process; the mesh spans all processes' devices
PYTHON=${PYTHON:-python}                          # the venv's python: activate the venv, or set PYTHON
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}

# Run from the caller's directory, so relative config / workdir / data paths are the caller's; the
# repository goes on PYTHONPATH in case lmtrain is not installed into $PYTHON.
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  # The explicit environment lmtrain.train.distributed reads; process 0 hosts the coordinator.
  JAX_COORDINATOR_ADDRESS=localhost:$PORT JAX_NUM_PROCESSES=$NUM_PROCESSES JAX_PROCESS_ID=$i \
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$DEVICES_PER_PROCESS \
    "$PYTHON" -m lmtrain.cli train "$@" 2>&1 | sed -u "s/^/[$i] /" &
done
trap 'kill $(jobs -pr) 2>/dev/null || true' INT TERM
status=0
while [[ -n "$(jobs -pr)" ]]; do
  wait -n || { status=$?; echo "a process failed (exit $status): stopping the others" >&2; kill $(jobs -pr) 2>/dev/null || true; break; }
done
wait || true
exit "$status"
