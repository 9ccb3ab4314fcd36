"""metrics.jsonl records, TensorBoard events, MFU arithmetic, the peak-FLOP/s table and probe."""

import json
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from lmtrain import configlib
from lmtrain.train import metrics as metrics_lib
from lmtrain.train.metrics import LogConfig, MetricsWriter


def test_jsonl_records_are_valid_json_with_fields(tmp_path):
    cfg = LogConfig(every_steps=2, tensorboard=True, progress=True)
    with MetricsWriter(tmp_path, cfg, total_steps=5) as writer:
        logged = [step for step in range(1, 6) if writer.should_log(step)]
        assert logged == [2, 4, 5]
        for step in logged:
            writer.advance(step)
            writer.write(step, {"loss": jnp.float32(3.0 / step), "lr": 1e-3, "tokens_per_sec": 1234.5,
                                "mfu": 0.42, "grad_norm": {"embed": jnp.float32(0.5), "blocks": 1.5},
                                "seq_len": jnp.int32(128)})
        writer.write(6, {"loss": float("nan"), "grad_norm": {"blocks": jnp.inf}})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4, 5, 6]
    first = records[0]
    assert set(first) == {"step", "time", "loss", "lr", "tokens_per_sec", "mfu", "grad_norm/embed",
                          "grad_norm/blocks", "seq_len"}
    assert first["loss"] == 1.5 and first["seq_len"] == 128 and isinstance(first["time"], float)
    assert records[-1]["loss"] is None and records[-1]["nonfinite"] == ["loss", "grad_norm/blocks"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_appends_across_writers_and_disabled_writes_nothing(tmp_path):
    cfg = LogConfig(tensorboard=False, progress=False)
    for step in (1, 2):
        with MetricsWriter(tmp_path, cfg, total_steps=2, start_step=step - 1) as writer:
            writer.write(step, {"loss": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    other = tmp_path / "other"
    with MetricsWriter(other, cfg, total_steps=2, enabled=False) as writer:
        assert writer.write(1, {"loss": 1.0})["loss"] == 1.0
    assert not other.exists()


def test_non_scalar_metric_is_an_error(tmp_path):
    with MetricsWriter(tmp_path, LogConfig(tensorboard=False, progress=False), 1) as writer:
        with pytest.raises(ValueError, match="'loss' has shape"):
            writer.write(1, {"loss": jnp.ones(3)})


def test_mfu_arithmetic():
    # 4 devices at 100 TFLOP/s peak; 1.2e15 FLOPs in 6 s = 2e14 FLOP/s = 50% of 4e14.
    assert metrics_lib.mfu(1.2e15, 6.0, 4, 100e12) == pytest.approx(0.5)
    assert metrics_lib.mfu(1e12, 1.0, 1, 1e12) == pytest.approx(1.0)
    assert math.isnan(metrics_lib.mfu(1e12, 0.0, 1, 1e12))


@pytest.mark.parametrize("kind, expected", [
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989.5e12),
    ("NVIDIA H100 PCIe", 756.5e12),
    ("NVIDIA H200", 989.5e12),
    ("TPU v4 lite", None),
    ("cpu", None),
])
def test_peak_table_lookup(kind, expected):
    assert metrics_lib.lookup_peak_flops(kind) == expected


def test_device_peak_flops_uses_table_then_override():
    fake = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    assert metrics_lib.device_peak_flops(fake) == 989.5e12
    assert metrics_lib.device_peak_flops(fake, override=1e15) == 1e15


def test_cpu_probe_is_measured_once():
    metrics_lib.measure_matmul_flops.cache_clear()
    cpu = jax.devices("cpu")[0]
    peak = metrics_lib.device_peak_flops(cpu)
    assert peak > 1e8  # any CPU does far more than 0.1 GFLOP/s on a 1024^2 matmul
    assert metrics_lib.device_peak_flops(cpu) == peak
    assert metrics_lib.measure_matmul_flops.cache_info().misses == 1


def test_log_config_validation():
    with pytest.raises(configlib.ConfigError, match="every_steps=0 must be >= 1"):
        configlib.from_dict(LogConfig, {"every_steps": 0})
