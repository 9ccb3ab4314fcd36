"""Launch scripts: the TPU-pod and SLURM scripts' dry runs print the exact command they would run."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    out = subprocess.run(["bash", str(ROOT / "launch" / script), *args], env={**os.environ, "DRY_RUN": "1", **env},
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    # the line is bash-quoted (printf %q, e.g. $'...' around newlines): let bash split it back into arguments
    args = subprocess.run(["bash", "-c", f'for a in {out.strip()}; do printf "%s\\0" "$a"; done'], capture_output=True,
                          text=True, check=True).stdout
    return args.split("\0")[:-1]


def test_tpu_pod_dry_run_prints_the_gcloud_command():
    cmd = dry_run("tpu_pod.sh", "train.steps=5", "optimizer.lr=1e-3", PROJECT="proj", TPU_NAME="pod", ZONE="z")
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--zone=z" in cmd and "--project=proj" in cmd and "--worker=all" in cmd
    remote = next(a for a in cmd if a.startswith("--command="))
    last = remote.splitlines()[-1]
    assert last.startswith(".venv/bin/lmtrain train configs/griffin_400m.yaml workdir=")
    assert last.split()[-2:] == ["train.steps=5", "optimizer.lr=1e-3"]


def test_slurm_dry_run_prints_the_srun_command():
    cmd = dry_run("slurm_gpu.sbatch", "train.steps=5", CONFIG="configs/griffin_1b.yaml", WORKDIR="/shared/x")
    assert cmd == ["srun", "--kill-on-bad-exit=1", ".venv/bin/lmtrain", "train", "configs/griffin_1b.yaml",
                   "workdir=/shared/x", "train.steps=5"]
