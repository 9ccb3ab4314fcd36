"""Training metrics: `metrics.jsonl`, TensorBoard scalars, a progress bar, and MFU.

`MetricsWriter.write(step, metrics)` appends one JSON object per logged step to
`<workdir>/metrics.jsonl` (flushed line by line, so a crash leaves only whole lines), writes the same
scalars to TensorBoard under `<workdir>/tensorboard`, and updates a tqdm bar showing step, loss,
tokens/s, MFU and ETA. Only process 0 writes. Non-finite values are written as JSON `null` and
their keys listed under `"nonfinite"`, so every line is valid JSON.

MFU = model FLOPs per step / (step time x devices x peak FLOP/s per device). The peak comes from a
table of accelerators' dense bf16 figures, a matmul probe on CPU, or `LogConfig.peak_flops`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain import configlib
from lmtrain.configlib import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """What to log, how often, and against which peak."""

    every_steps: int = configlib.field(10, help="Write metrics every N steps (and at the last step).")
    tensorboard: bool = configlib.field(True, help="Also write TensorBoard events to <workdir>/tensorboard.")
    progress: bool = configlib.field(True, help="Show a progress bar (step, loss, tokens/s, MFU, ETA).")
    peak_flops: float = configlib.field(0.0, help="Peak FLOP/s per device for MFU (0: from the device "
                                                  "table, or a matmul probe on CPU).")

    def validate(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"every_steps={self.every_steps} must be >= 1")
        if self.peak_flops < 0:
            raise ConfigError(f"peak_flops={self.peak_flops} must be >= 0 (0: auto)")


# Dense (no 2:4 sparsity) bf16 peak per chip, matched against `device.device_kind` in order
# (case-insensitive regex search; more specific patterns first). Vendor figures:
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"tpu v6( lite|e)", 918e12),  # Cloud TPU v6e (Trillium) docs: 918 TFLOPs bf16 per chip
    (r"tpu v5( lite|e)", 197e12),  # Cloud TPU v5e docs: 197 TFLOPs bf16 per chip
    (r"tpu v5p?$", 459e12),        # Cloud TPU v5p docs: 459 TFLOPs bf16 per chip
    (r"tpu v4$", 275e12),          # Cloud TPU v4 docs: 275 TFLOPs bf16 per chip
    (r"h200.*nvl", 1671e12 / 2),   # H200 NVL datasheet: 1,671 TFLOPS bf16 with sparsity
    (r"h200", 1979e12 / 2),        # H200 SXM / GH200 datasheet: 1,979 TFLOPS bf16 with sparsity
    (r"h100.*pcie", 1513e12 / 2),  # H100 PCIe datasheet: 1,513 TFLOPS bf16 with sparsity
    (r"h100.*nvl", 1671e12 / 2),   # H100 NVL datasheet: 1,671 TFLOPS bf16 with sparsity
    (r"h100", 1979e12 / 2),        # H100 SXM datasheet: 1,979 TFLOPS bf16 with sparsity
    (r"a100", 312e12),             # A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity)
)


def lookup_peak_flops(device_kind: str) -> float | None:
    """The table's dense bf16 peak for `device_kind`, or None if it is not a known accelerator."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, device_kind.strip(), flags=re.IGNORECASE):
            return flops
    return None


@functools.cache
def measure_matmul_flops(device: jax.Device, dtype: str = "float32",
                         sizes: tuple[int, ...] = (256, 512, 1024), repeats: int = 3) -> float:
    """Best FLOP/s of a jitted square matmul on `device` over `sizes` (measured once, cached)."""
    best = 0.0
    for n in sizes:
        a = jax.device_put(jnp.ones((n, n), dtype), device)
        matmul = jax.jit(jnp.matmul)
        matmul(a, a).block_until_ready()  # compile
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, a).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def device_peak_flops(device: jax.Device | None = None, override: float = 0.0) -> float:
    """Peak FLOP/s of one device: `override` if > 0, else the table, else a matmul probe.

    On CPU the probe (f32) is the honest peak; on an accelerator missing from the table it runs in
    bf16 with a warning, so MFU is relative to achieved, not datasheet, throughput.
    """
    if override > 0:
        return float(override)
    device = device or jax.devices()[0]
    peak = lookup_peak_flops(device.device_kind)
    if peak is not None:
        return peak
    if device.platform == "cpu":
        return measure_matmul_flops(device, "float32")
    log.warning("no peak FLOP/s known for device kind %r; using a measured bf16 matmul rate instead "
                "(set log.peak_flops to override)", device.device_kind)
    return measure_matmul_flops(device, "bfloat16", sizes=(1024, 2048, 4096))


def mfu(flops_per_step: float, step_time_s: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over `num_devices * peak` (NaN if undefined)."""
    if step_time_s <= 0 or num_devices <= 0 or peak <= 0:
        return float("nan")
    return flops_per_step / (step_time_s * num_devices * peak)


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (str, bool)) or value is None:
            flat[name] = value
        else:
            array = np.asarray(value)
            if array.size != 1:
                raise ValueError(f"metric {name!r} has shape {array.shape}; log scalars only")
            item = array.item()
            flat[name] = item if isinstance(item, int) else float(item)
    return flat


class MetricsWriter:
    """Writes logged steps to metrics.jsonl, TensorBoard and a progress bar (process 0 only)."""

    def __init__(self, workdir: str | Path, cfg: LogConfig, total_steps: int, *, start_step: int = 0,
                 enabled: bool | None = None):
        self.cfg = cfg
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=str(Path(workdir) / "tensorboard"))
        if cfg.progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             desc="train")

    def should_log(self, step: int) -> bool:
        """True every `every_steps` steps and at the last step."""
        return step % self.cfg.every_steps == 0 or step == self.total_steps

    def advance(self, step: int) -> None:
        """Moves the progress bar to `step` (cheap; call every step)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Logs `metrics` (scalars, possibly nested dicts -> 'a/b' keys) for `step`; returns the record."""
        flat = _flatten(metrics)
        nonfinite = [k for k, v in flat.items() if isinstance(v, float) and not math.isfinite(v)]
        record: dict[str, Any] = {"step": int(step), "time": time.time(), **flat}
        for key in nonfinite:
            record[key] = None
        if nonfinite:
            record["nonfinite"] = nonfinite
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in flat.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=step)
        if self._bar is not None:
            self.advance(step)
            self._bar.set_postfix_str(self._postfix(flat), refresh=True)
        else:  # no bar: one log line per logged step / evaluation
            shown = {k: flat[k] for k in ("loss", "eval/loss", "lr", "tokens_per_sec") if k in flat}
            log.info("step %d/%d: %s", step, self.total_steps,
                     " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
        return record

    @staticmethod
    def _postfix(flat: Mapping[str, Any]) -> str:
        shown = (("loss", "loss={:.4f}", 1), ("tokens_per_sec", "tok/s={:,.0f}", 1),
                 ("mfu", "mfu={:.1f}%", 100))
        return " ".join(fmt.format(scale * flat[key]) for key, fmt, scale in shown
                        if isinstance(flat.get(key), (int, float)))

    def close(self) -> None:
        """Flushes and closes the file, TensorBoard writer and progress bar."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
