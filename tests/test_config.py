"""Run config: every preset loads; each kind of mistake fails early with a message that names the fix."""

from pathlib import Path

import jax
import pytest

from lmtrain import configlib
from lmtrain.config import Config, ConfigError, check_runtime, load_config, save_config
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.train.mesh import make_mesh, resolve_sizes

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
PRESETS = sorted(ROOT.glob("configs/*.yaml"))


def test_presets_exist():
    assert DEMO in PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.model.vocab_size > 0
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg  # what a run saves is what it loads


def test_overrides_apply_with_types():
    cfg = load_config(DEMO, ["optimizer.lr=1e-3", "model.pattern=RRA", "train.steps=7", "mesh.rules.vocab=null",
                             "data.sources=[{kind: stdlib}, {kind: jsonl, path: 'x/*.jsonl', weight: 2}]"])
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float) and cfg.train.steps == 7
    assert cfg.mesh.rules["vocab"] is None and cfg.mesh.rules["mlp"] == "tensor"  # defaults kept
    assert cfg.data.sources[1].kind == "jsonl" and cfg.data.sources[1].weight == 2.0


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1e-3", r"unknown config key 'optimizer\.lrr' \(did you mean 'lr'\?\)"),
    ("modle.width=64", r"unknown config key 'modle' \(did you mean 'model'\?\)"),
    ("data.tokenizer.knd=byte", r"unknown config key 'data\.tokenizer\.knd' \(did you mean 'kind'\?\)"),
    ("model.width=wide", r"model\.width: expected an integer, got 'wide'"),
    ("optimizer.lr=fast", r"optimizer\.lr: expected a number, got 'fast'"),
    ("checkpoint.async_save=maybe", r"checkpoint\.async_save: expected true or false"),
    ("data.sources=[{kind: stdlib, weight: heavy}]", r"data\.sources\[0\]\.weight: expected a number"),
    ("model.dtype=float8", r"model\.dtype: 'float8' is not one of"),
    ("model.scan_backend=asociative", r"did you mean 'associative'"),
    ("model.pattern=RRX", r"model: pattern 'RRX' has unknown letter\(s\) \['X'\]; known: .*R \("),
    ("model.width=130", r"width 130 is not divisible by rglru\.num_heads 4"),
    ("model.attention.window=512", r"model\.attention\.window 512 exceeds data\.seq_len 256"),
    ("train.grad_accum=3", r"global_batch_size 8 is not divisible by train\.grad_accum 3"),
    ("mesh.data=-1", r"only one mesh axis may be -1"),
    ("mesh.rules.embd=fsdp", r"unknown logical axis 'embd' \(did you mean 'embed'\?\)"),
    ("model.width", r"override 'model\.width' must look like KEY=VALUE"),
    ("optimizer.lr=.nan", r"optimizer\.lr: expected a finite number, got nan"),
    ("optimizer.lr=.inf", r"optimizer\.lr: expected a finite number, got inf"),
    ("model.pattern=[R", r"override 'model\.pattern=\[R': the value is not valid YAML"),
    ("model.width.inner=3", r"override 'model\.width\.inner': 'width' is a value, not a section"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_window_only_checked_with_local_attention():
    cfg = load_config(DEMO, ["model.attention.window=512", "model.pattern=R"])  # no 'A' layer: window unused
    assert cfg.model.attention.window == 512


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: {width: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_mesh_sizes_must_match_devices():
    cfg = load_config(DEMO, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"])
    with pytest.raises(ConfigError, match=r"needs 4 devices but 1 are available"):
        make_mesh(cfg.mesh, jax.devices()[:1])
    with pytest.raises(ConfigError, match=r"needs 4 devices but 8 are available"):
        resolve_sizes(cfg.mesh, 8)
    fill = load_config(DEMO, ["mesh.data=3", "mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match=r"cannot fill fsdp=-1 because 8 devices are not divisible"):
        resolve_sizes(fill.mesh, 8)
    assert resolve_sizes(load_config(DEMO, ["mesh.data=2"]).mesh, 8) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_runtime_batch_divisibility():
    cfg = load_config(DEMO, ["data.global_batch_size=12"])
    check_runtime(cfg, num_devices=4, batch_axes_size=4, tokenizer_vocab=259)
    with pytest.raises(ConfigError, match=r"global_batch_size 12 is not divisible by the data-parallel size 8"):
        check_runtime(cfg, num_devices=8, batch_axes_size=8, tokenizer_vocab=259)
    accum = load_config(DEMO, ["data.global_batch_size=16", "train.grad_accum=4"])
    with pytest.raises(ConfigError, match=r"microbatch 4 .* not divisible by the data-parallel size 8"):
        check_runtime(accum, num_devices=8, batch_axes_size=8, tokenizer_vocab=259)


def test_runtime_tokenizer_vocab():
    cfg = load_config(DEMO, ["model.vocab_size=256"])  # the byte tokenizer needs 259 ids
    vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    assert vocab == 259
    with pytest.raises(ConfigError, match=r"tokenizer has 259 ids but model\.vocab_size is 256; set "
                                          r"model\.vocab_size >= 259"):
        check_runtime(cfg, num_devices=1, batch_axes_size=1, tokenizer_vocab=vocab)


def test_every_field_documented():
    rows = configlib.describe(Config)
    assert len(rows) > 50
    assert all(help_ for _, _, _, help_ in rows), [name for name, _, _, help_ in rows if not help_]


def test_fixed_length_tuple_fields_coerce_each_item_with_its_type():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Pair:
        pair: tuple[int, str] = (0, "")

    assert configlib.from_dict(Pair, {"pair": [3, "x"]}).pair == (3, "x")
    with pytest.raises(ConfigError, match=r"pair\[1\]: expected a string, got 4"):
        configlib.from_dict(Pair, {"pair": [3, 4]})
    with pytest.raises(ConfigError, match="expected 2 items"):
        configlib.from_dict(Pair, {"pair": [3]})


def test_empty_config_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="the config is empty; start from configs/demo.yaml"):
        load_config(empty)


def test_flat_model_keys_of_earlier_versions_still_load(tmp_path, caplog):
    old = tmp_path / "old.yaml"  # a run config written before the per-kind sections existed
    old.write_text("model:\n  width: 64\n  num_heads: 2\n  window: 16\n  lru_width: 96\n  attn_block: 8\n")
    cfg = load_config(old)
    assert (cfg.model.attention.num_heads, cfg.model.rglru.num_heads, cfg.model.attention.window) == (2, 2, 16)
    assert (cfg.model.rglru.width, cfg.model.attention.block) == (96, 8)
    assert "from an earlier version" in caplog.text
    assert load_config(DEMO, ["model.window=32"]).model.attention.window == 32  # an old-style override wins
