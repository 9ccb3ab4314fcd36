"""Length curricula: schedule values against closed forms, buckets, constant-token rows, config errors."""

import math

import numpy as np
import pytest

from lmtrain import configlib
from lmtrain.configlib import ConfigError
from lmtrain.data.config import CurriculumConfig, DataConfig, StageConfig, check_stages
from lmtrain.data.curriculum import Curriculum


def _cur(seq_len=32, global_batch_size=4, seed=0, **curriculum):
    cfg = DataConfig(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                     curriculum=CurriculumConfig(**{"bucket": 1, **curriculum}))
    cfg.validate()
    return Curriculum(cfg)


def test_constant_is_seq_len_and_global_batch():
    cur = _cur()
    assert [cur.length_at(k) for k in (0, 5, 10**6)] == [32] * 3
    assert cur.rows_at(7) == 4 and cur.shapes() == ((4, 32),)


def test_staged_holds_each_length_until_its_step_and_the_last_forever():
    cur = _cur(kind="staged", stages=((10, 8), (20, 16), (30, 24)), batch_mode="fixed_batch")
    expected = [8] * 10 + [16] * 10 + [24] * 30
    assert [cur.length_at(k) for k in range(50)] == expected
    assert cur.length_at(10**7) == 24 and cur.buckets() == (8, 16, 24)


def test_warmup_rises_linearly_in_increments_to_seq_len():
    cur = _cur(kind="warmup", start_length=8, increment=8, warmup_steps=10, batch_mode="fixed_batch")
    assert [cur.length_at(k) for k in range(12)] == [8, 8, 8, 8, 16, 16, 16, 24, 24, 24, 32, 32]
    cur = _cur(seq_len=1024, kind="warmup", start_length=64, increment=64, warmup_steps=1000, batch_mode="fixed_batch")
    for k in range(0, 1200, 7):
        linear = 64 + (1024 - 64) * min(k, 1000) / 1000  # the line it follows from below, one increment behind
        assert cur.length_at(k) <= linear < cur.length_at(k) + 64 or (k >= 1000 and cur.length_at(k) == 1024)
        assert (cur.length_at(k) - 64) % 64 == 0
    assert cur.buckets() == tuple(range(64, 1025, 64))


def test_mixture_draws_lengths_by_weight_per_step_and_seed():
    cur = _cur(kind="mixture", lengths=(8, 16, 32), weights=(1.0, 0.0, 3.0))
    draws = np.array([cur.length_at(k) for k in range(4000)])
    assert set(draws.tolist()) == {8, 32} and cur.buckets() == (8, 32)
    std = math.sqrt(0.25 * 0.75 / len(draws))
    assert abs(np.mean(draws == 8) - 0.25) < 4 * std
    assert [cur.length_at(k) for k in range(50)] == draws[:50].tolist()  # a function of the step
    other = _cur(kind="mixture", lengths=(8, 16, 32), weights=(1.0, 0.0, 3.0), seed=1)
    assert [other.length_at(k) for k in range(50)] != draws[:50].tolist()
    uniform = _cur(kind="mixture", lengths=(8, 16))
    assert abs(np.mean([uniform.length_at(k) == 8 for k in range(2000)]) - 0.5) < 4 * math.sqrt(0.25 / 2000)


def test_lengths_round_up_to_buckets_capped_at_seq_len():
    cur = _cur(seq_len=40, kind="staged", stages=((10, 5), (20, 17), (30, 33)), bucket=16)
    assert [cur.length_at(k) for k in (0, 10, 20)] == [16, 32, 40]
    assert cur.buckets() == (16, 32, 40)
    assert cur.shapes() == ((10, 16), (5, 32), (4, 40))  # constant tokens: 4 x 40 = 160 per step


def test_constant_tokens_and_fixed_batch_rows():
    cur = _cur(seq_len=64, global_batch_size=8, kind="staged", stages=((3, 16), (6, 32), (9, 64)))
    for k in range(12):
        assert cur.rows_at(k) * cur.length_at(k) == 8 * 64
    assert cur.shapes() == ((32, 16), (16, 32), (8, 64)) and cur.rows_at(4) == 16
    fixed = _cur(seq_len=64, global_batch_size=8, kind="staged", stages=((3, 16), (6, 64)), batch_mode="fixed_batch")
    assert fixed.shapes() == ((8, 16), (8, 64)) and fixed.rows_at(0) == 8


@pytest.mark.parametrize("curriculum,match", [
    ({"kind": "staged"}, r"curriculum\.stages: kind staged needs"),
    ({"kind": "staged", "stages": [[10, 64]]}, r"curriculum\.stages: lengths must be in \[1, data\.seq_len=32\]"),
    ({"kind": "staged", "stages": [[10, 8], [5, 16]]}, r"strictly increasing"),
    ({"kind": "warmup", "start_length": 48}, r"curriculum\.start_length: lengths must be in"),
    ({"kind": "warmup", "increment": 0, "start_length": 8}, r"curriculum\.increment"),
    ({"kind": "mixture"}, r"curriculum\.lengths: kind mixture needs"),
    ({"kind": "mixture", "lengths": [8, 16], "weights": [1.0]}, r"curriculum\.weights: need one weight"),
    ({"kind": "warmup", "start_length": 8, "stages": [[3, 8]]}, r"curriculum\.stages: set, but only kind staged"),
    ({"kind": "mixture", "lengths": [8, 24], "bucket": 1}, r"constant_tokens needs .* \(128\) .* 24 is not a divisor"),
    ({"bucket": 0}, r"curriculum: bucket: must be >= 1"),
    ({"kind": "stagged"}, r"did you mean 'staged'"),
])
def test_curriculum_config_errors_name_the_field(curriculum, match):
    with pytest.raises(ConfigError, match=match):
        configlib.from_dict(DataConfig, {"seq_len": 32, "global_batch_size": 4, "curriculum": curriculum})


def test_process_count_must_divide_every_steps_rows():
    cur = _cur(seq_len=32, global_batch_size=2, kind="staged", stages=((3, 8), (6, 32)))  # rows 8 then 2
    cur.check_processes(2)
    with pytest.raises(ValueError, match="gives 2 rows at length 32, which is not divisible by process_count=4"):
        cur.check_processes(4)


def test_stage_config_errors():
    with pytest.raises(ConfigError, match=r"start_step: must be > 0"):
        configlib.from_dict(StageConfig, {"replay": 0.1})
    with pytest.raises(ConfigError, match=r"replay: must be in \[0, 1\)"):
        configlib.from_dict(StageConfig, {"start_step": 5, "replay": 1.0})
    with pytest.raises(ConfigError, match=r"min_lr_ratio"):
        configlib.from_dict(StageConfig, {"start_step": 5, "min_lr_ratio": 2.0})
    with pytest.raises(ConfigError, match=r"stages\[1\]\.start_step: must be > stages\[0\]\.start_step \(10\)"):
        check_stages((StageConfig(start_step=10), StageConfig(start_step=10)))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.start_step: must be > 0"):
        check_stages((StageConfig(),))
    stage = configlib.from_dict(StageConfig, {"start_step": 5, "sources": [{"kind": "stdlib"}], "replay": 0.1})
    check_stages((stage,))
    assert stage.sources[0].kind == "stdlib" and stage.lr == 0.0 and stage.min_lr_ratio == -1.0


def test_task_source_config_errors():
    base = {"seq_len": 32, "sources": []}
    with pytest.raises(ConfigError, match=r"sources\[0\]: task: unknown task 'mqr' \(did you mean 'mqar'\?\)"):
        configlib.from_dict(DataConfig, {**base, "sources": [{"kind": "task", "task": "mqr"}]})
    with pytest.raises(ConfigError, match=r"task_options: .*num_pair.*options of mqar: num_pairs"):
        configlib.from_dict(DataConfig, {**base, "sources": [{"kind": "task", "task": "mqar",
                                                              "task_options": {"num_pair": 3}}]})
    with pytest.raises(ConfigError, match=r"task, task_options: only for kind: task"):
        configlib.from_dict(DataConfig, {**base, "sources": [{"kind": "stdlib", "task": "mqar"}]})
    cfg = configlib.from_dict(DataConfig, {**base, "sources": [{"kind": "task", "task": "mqar",
                                                                "task_options": {"num_pairs": 4}, "loss_on": "all"}]})
    assert cfg.sources[0].make_task().num_pairs == 4
