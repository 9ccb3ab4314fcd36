#!/usr/bin/env bash
# Train on a multi-host Cloud TPU slice (e.g. v4-32 = 4 hosts): runs `lmtrain train` on every host
# at once over `gcloud ... ssh --worker=all`. JAX finds the other hosts itself (TPU metadata), so no
# addresses are needed. Not tested here (no TPU); see docs/multihost.md.
#
# Edit the variables below, then:   launch/tpu_pod.sh [KEY=VALUE ...]   (extra args: config overrides)
# DRY_RUN=1 launch/tpu_pod.sh ... prints the exact command instead of running it.
# The TPU VM must exist, e.g.:
#   gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --accelerator-type=v4-32 \
#     --version=tpu-ubuntu2204-base
# The run lives in this terminal: use tmux/screen, or rerun the same command to resume after a
# disconnect or preemption (the workdir keeps the checkpoints).
set -euo pipefail

TPU_NAME=${TPU_NAME:-my-tpu}           # the TPU VM (slice) name
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}
CONFIG=configs/griffin_400m.yaml       # relative to the repository
# Every host must see the workdir at the same path (checkpoints are written by all hosts together):
# an NFS / Filestore mount, or a GCS bucket mounted with gcsfuse. gs:// URLs are not supported.
WORKDIR=/mnt/shared/runs/griffin_400m
REPO_URL=https://github.com/your-org/lmtrain.git
REVISION=main                          # branch, tag or commit to run
CODE_DIR='~/lmtrain'                   # where each host keeps its checkout and .venv

overrides=$(printf '%q ' "$@")
# On every host: fetch the code, (re)install it into a venv with TPU jax, then train.
remote="set -euo pipefail
if [ ! -d $CODE_DIR ]; then git clone -q $REPO_URL $CODE_DIR; fi
cd $CODE_DIR && git fetch -q origin $REVISION && git checkout -q --detach FETCH_HEAD
[ -d .venv ] || python3 -m venv .venv
.venv/bin/pip install -q -e . 'jax[tpu]>=0.10.2,<0.11'
.venv/bin/lmtrain train $CONFIG workdir=$WORKDIR $overrides"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$remote")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
"${cmd[@]}"
