"""The loop with length-generalization features: interventions + TBPTT streams + a length curriculum +
a continual-pretraining stage resume exactly; an intervention switched on at resume starts fresh."""

import logging

import jax
import numpy as np
import pytest
from test_loop import N, checkpoint_steps, config, records

from lmtrain.run import train

pytestmark = pytest.mark.usefixtures("compilation_cache")  # tests/conftest.py

ALL = ["train.interventions=[{kind: fitted_noise, prob: 0.5}, {kind: tbptt, start_step: 3}]",
       "data.curriculum={kind: staged, batch_mode: fixed_batch, bucket: 16, stages: [[3, 16], [100, 32]]}",
       "stages=[{start_step: 5, lr: 1e-3, warmup_steps: 2}]"]


def test_lengthgen_run_resumes_exactly(tmp_path):
    straight = train(config(tmp_path / "a", f"train.steps={2 * N}", *ALL))
    first = train(config(tmp_path / "b", f"train.steps={N}", *ALL))
    assert checkpoint_steps(tmp_path / "b") == [N]
    second = train(config(tmp_path / "b", f"train.steps={2 * N}", *ALL))
    assert first["step"] == N and second["start_step"] == N
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    for step in range(1, 2 * N + 1):
        for key in ("loss", "grad_norm", "lr", "seq_len", "intervened_rows", "state_rms"):
            assert a[step][key] == b[step][key], (step, key)
    assert [a[s]["seq_len"] for s in range(1, 2 * N + 1)] == [16, 16, 16, 32, 32, 32, 32, 32]
    # lr of steps 0..7: warmup over 4 steps to 3e-3; stage 1 from step 5 re-warms from 3e-3 to 1e-3 over 2 steps
    lr = [a[s]["lr"] for s in range(1, 2 * N + 1)]
    assert lr == pytest.approx([0.0, 7.5e-4, 1.5e-3, 2.25e-3, 3e-3, 3e-3, 2e-3, 1e-3])
    leaves = lambda out: jax.tree.leaves(jax.device_get(out["state"]))
    for x, y in zip(leaves(straight), leaves(second), strict=True):
        np.testing.assert_array_equal(x, y)
    assert int(second["state"].stats.count) == 2 * N


def test_interventions_switched_at_resume(tmp_path, caplog):
    """Checkpoints record their layout: a carry the new config drops is ignored, a missing one starts fresh."""
    train(config(tmp_path, f"train.steps={N}", "train.interventions=[{kind: state_passing}]"))
    out = train(config(tmp_path, f"train.steps={N + 1}"))
    assert out["start_step"] == N and out["state"].carry is None
    caplog.set_level(logging.WARNING)
    out = train(config(tmp_path, f"train.steps={N + 2}", "train.interventions=[{kind: fitted_noise}]"))
    assert out["start_step"] == N + 1 and out["step"] == N + 2 and int(out["state"].stats.count) == 1
    assert "has no stats" in caplog.text
    assert records(tmp_path)[N + 2]["intervened_rows"] == 1.0
