"""lmtrain.sample and `lmtrain sample` against independent references.

Greedy decoding is checked against a naive loop that reruns the whole sequence through `model(...)`
for every new token (no state, no padding); sampling against probabilities computed here in float64
from the model's logits. Models are tiny (width 32) with their weights scaled up so their next-token
distributions are peaked and vary with the context (a fresh init mostly repeats the last token).
"""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain.cli import main
from lmtrain.config import load_config
from lmtrain.configlib import updated
from lmtrain.models import LanguageModel, ModelConfig
from lmtrain.sample import SampleError, SamplingParams, bucket_length, cut_at_stop, generate, row_keys, sample_logits
from lmtrain.sample import sample as sample_text

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]  # 3 and 11 tokens: one bucket of 16, padded rows
NEW = 12
SCALE = 4.0  # weight scale (not the embedding) that makes a random model's outputs depend on the context


def _sharpen(tree, scale=SCALE):
    def f(path, x):
        name = jax.tree_util.keystr(path)
        return x * scale if x.ndim >= 2 and "embedding" not in name else x
    return jax.tree_util.tree_map_with_path(f, tree)


def tiny_model(pattern: str, **changes) -> LanguageModel:
    keys = {"vocab_size": 64, "width": 32, "num_layers": 3, "pattern": pattern, "mlp_expansion": 1,
            "rglru.num_heads": 2, "attention.num_heads": 2, "attention.window": 8}
    if "M" in pattern:
        keys |= {"num_layers": 2, "mamba.head_dim": 8, "mamba.state_size": 8, "mamba.chunk": 8}
    model = LanguageModel(updated(ModelConfig(), keys | changes), rngs=nnx.Rngs(0))
    nnx.update(model, _sharpen(nnx.state(model, nnx.Param)))
    return model


def last_logits(model: LanguageModel, length: int = 32):
    """seq -> logits after its last token, from one call on the whole sequence (no state, no segment ids).
    The sequence is zero-filled after its end to a fixed `length` (one compilation; a causal model's logits
    at t do not depend on later tokens)."""
    forward = jax.jit(lambda tokens: model(tokens)[0])
    return lambda seq: np.asarray(forward(jnp.asarray([seq + [0] * (length - len(seq))], jnp.int32))[0, len(seq) - 1])


def naive_greedy(logits_of, prompt: list[int], n: int) -> list[int]:
    """Reference: the full sequence through the model for every new token, argmax of the last logits."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(logits_of(seq))))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def rra():
    model = tiny_model("RRA")
    logits_of = last_logits(model)
    return model, logits_of, [naive_greedy(logits_of, p, NEW) for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy_rra(rra):
    model, _, _ = rra
    return generate(model, PROMPTS, max_new_tokens=NEW, greedy=True)


# ---------------------------------------------------------------------------------------- decoding
def test_greedy_equals_naive_full_sequence_loop_rra(rra, greedy_rra):
    """Batched, left-padded prompts of different lengths (window 8 < context 23: the sliding window moves)."""
    want = rra[2]
    assert [g.tokens for g in greedy_rra] == want
    assert [g.reason for g in greedy_rra] == ["length", "length"]
    assert len(set(want[0] + want[1])) > 6  # the reference is not a constant sequence


def test_greedy_equals_naive_full_sequence_loop_mamba():
    model = tiny_model("MA")
    logits_of = last_logits(model)
    want = [naive_greedy(logits_of, p, NEW) for p in PROMPTS]
    got = generate(model, PROMPTS, max_new_tokens=NEW, temperature=0.0)  # temperature 0 = greedy
    assert [g.tokens for g in got] == want
    assert len(set(want[0] + want[1])) > 6


def test_batched_prompts_equal_each_prompt_alone(rra, greedy_rra):
    model = rra[0]
    for i, p in enumerate(PROMPTS):  # each prompt alone (with a copy of itself: the same compiled batch of 2)
        alone = generate(model, [p, p], max_new_tokens=NEW, greedy=True)
        assert alone[0].tokens == alone[1].tokens == greedy_rra[i].tokens
    # sampled: the random stream of a prompt is its index in the request, whatever shares the batch
    both = generate(model, PROMPTS, max_new_tokens=NEW, seed=3, temperature=1.0)
    swapped = generate(model, PROMPTS[::-1], max_new_tokens=NEW, seed=3, temperature=1.0, rows=[1, 0])
    assert [g.tokens for g in swapped[::-1]] == [g.tokens for g in both]
    alone = generate(model, [PROMPTS[1]] * 2, max_new_tokens=NEW, seed=3, temperature=1.0, rows=[1, 1])
    assert alone[0].tokens == alone[1].tokens == both[1].tokens


def test_top_k_1_is_greedy_and_seeds_are_deterministic(rra, greedy_rra):
    model = rra[0]
    assert generate(model, PROMPTS, max_new_tokens=NEW, top_k=1, seed=5) == greedy_rra
    a = generate(model, PROMPTS, max_new_tokens=NEW, seed=1, top_p=0.9)
    assert generate(model, PROMPTS, max_new_tokens=NEW, seed=1, top_p=0.9) == a
    assert generate(model, PROMPTS, max_new_tokens=NEW, seed=2, top_p=0.9) != a


def test_stop_id_ends_its_row_only(rra, greedy_rra):
    model = rra[0]
    row0, row1 = (g.tokens for g in greedy_rra)
    k = next(i for i in range(2, NEW) if row0[i] not in row0[:i])
    eos = row0[k]
    got = generate(model, PROMPTS, max_new_tokens=NEW, greedy=True, stop_ids=[eos])
    assert got[0].tokens == row0[:k] and got[0].reason == "eos"
    cut = row1.index(eos) if eos in row1 else NEW
    assert got[1].tokens == row1[:cut] and got[1].reason == ("eos" if eos in row1 else "length")


# ---------------------------------------------------------------------------------------- sampling
def _chi2_ok(counts: np.ndarray, probs: np.ndarray, n: int) -> bool:
    """Pearson chi-square goodness of fit at ~p = 1e-4 (Wilson-Hilferty quantile); small bins pooled."""
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat, df = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    z = 3.72  # one-sided normal quantile of 1e-4
    return stat < df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def draws(rra):
    """4000 one-step draws from a fixed state (the logits after PROMPTS[0]), by settings."""
    logits_V = rra[1](PROMPTS[0])
    n = 4000
    keys = row_keys(jax.random.key(0), jnp.arange(n), jnp.int32(0))
    draw = jax.jit(lambda logits_V, keys, sp: sample_logits(jnp.broadcast_to(logits_V, (n, logits_V.size)), keys, sp))
    return logits_V, n, lambda **kw: np.asarray(draw(logits_V, keys, SamplingParams(**kw).arrays()))


def test_temperature_matches_softmax_of_logits_over_t(draws):
    logits, n, draw = draws
    for t in (0.5, 1.0, 2.0):
        counts = np.bincount(draw(temperature=t), minlength=logits.size)
        assert _chi2_ok(counts, _softmax64(logits / t), n), t
    counts = np.bincount(draw(temperature=0.5), minlength=logits.size)
    assert not _chi2_ok(counts, _softmax64(logits), n)  # the test tells temperatures apart


def test_top_p_only_draws_inside_the_nucleus(draws):
    logits, n, draw = draws
    probs = _softmax64(logits)
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    for p in (0.3, 0.6, 0.9):
        nucleus = order[before < p]
        got = draw(top_p=p)
        assert set(got.tolist()) <= set(nucleus.tolist()), p
        inside = np.zeros_like(probs)
        inside[nucleus] = probs[nucleus] / probs[nucleus].sum()
        assert _chi2_ok(np.bincount(got, minlength=logits.size), inside, n), p
    assert 1 < len(order[before < 0.6]) < len(order) // 2  # a nucleus that is a real restriction


def test_top_k_draws_among_the_k_likeliest(draws):
    logits, n, draw = draws
    probs = _softmax64(logits)
    top = np.argsort(-probs)[:5]
    got = draw(top_k=5)
    assert set(got.tolist()) <= set(top.tolist())
    inside = np.zeros_like(probs)
    inside[top] = probs[top] / probs[top].sum()
    assert _chi2_ok(np.bincount(got, minlength=logits.size), inside, n)
    assert (draw(greedy=True) == np.argmax(logits)).all()


def test_request_checks():
    cfg = updated(ModelConfig(), {"vocab_size": 64, "width": 32, "num_layers": 1, "pattern": "G",
                                  "attention.max_len": 16})
    model = nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))  # the checks run before any compute
    with pytest.raises(SampleError, match=r"model\.attention\.max_len"):
        generate(model, [[1] * 10], max_new_tokens=7)
    for kw, msg in [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"),
                    ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(SampleError, match=msg):
            generate(model, [[1, 2]], **({"max_new_tokens": 4} | kw))
    with pytest.raises(SampleError, match="outside"):
        generate(model, [[1, 64]], max_new_tokens=4)
    assert [bucket_length(n) for n in (1, 16, 17, 1024, 1025)] == [16, 16, 32, 1024, 2048]
    assert cut_at_stop("ab\n\ncd", ["\n\n", "c"]) == ("ab", True)


# ---------------------------------------------------------------------------------------- text + CLI
def make_run(workdir: Path, overrides=()) -> Path:
    """A run directory with a checkpoint of scaled initial parameters (nothing trained; see tests/eval)."""
    from lmtrain.run import prepare_workdir, state_fields
    from lmtrain.train.checkpoint import Checkpointer
    from lmtrain.train.mesh import make_mesh
    from lmtrain.train.step import Trainer

    tiny = ["model.width=32", "model.num_layers=3", "model.rglru.num_heads=2", "model.attention.num_heads=2",
            "model.attention.window=16", "model.mlp_expansion=1", "data.seq_len=32", "data.global_batch_size=2",
            "checkpoint.async_save=false", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
    cfg = load_config(CONFIG, [*tiny, *overrides, f"workdir={workdir}"])
    prepare_workdir(cfg)
    state = Trainer(cfg, make_mesh(cfg.mesh)).init_state()
    state = state._replace(params=_sharpen(state.params))
    with Checkpointer(cfg.checkpoint.path(workdir), cfg.checkpoint) as ckpt:
        ckpt.maybe_save(2, state, {}, force=True, metadata=state_fields(state))
    return workdir


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "griffin")


@pytest.fixture(scope="module")
def full(run):
    """Greedy completion of "ab" (24 tokens), streamed."""
    pieces = []
    out = sample_text(run, ["ab"], greedy=True, max_new_tokens=24, stream=lambda i, t: pieces.append((i, t)))
    assert pieces[0] == (0, "") and "".join(t for _, t in pieces) == out[0].text
    return out[0]


def test_stop_strings_truncate_and_end_the_row(run, full):
    assert full.reason == "length" and len(full.tokens) == 24
    text = full.text
    at = next(i for i in range(1, len(text) - 1) if text[i] != "\ufffd" and text.find(text[i]) == i)
    stop = text[at]
    pieces = []
    got = sample_text(run, ["ab"], greedy=True, max_new_tokens=24, stop=[stop, "never in this text \x00"],
                 stream=lambda i, t: pieces.append(t))
    assert got[0].text == text[:at] and got[0].reason == "stop"
    assert "".join(pieces) == got[0].text
    assert len(got[0].tokens) < 24  # the row stopped when its text hit the stop string


def test_cli_prints_the_completion(run, full, capsys):
    assert main(["sample", str(run), "--prompt", "ab", "--greedy", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr()
    assert out.out == "ab" + full.text + "\n"
    assert "step 2: 1 prompt(s), 24 new tokens" in out.err
    prompts = run.parent / "prompts.jsonl"
    prompts.write_text('"ab"\n\n{"prompt": "ab"}\n')
    assert "@@@" not in full.text  # batches of 1 and a stop string: the compiled program of the streamed call
    assert main(["sample", str(run), "--prompt-file", str(prompts), "--greedy", "--max-new-tokens", "24",
                 "--no-stream", "--batch-size", "1", "--stop", "@@@"]) == 0
    assert capsys.readouterr().out == "ab" + full.text + "\n----\n" + "ab" + full.text + "\n"


def test_cli_errors_are_one_line(run, tmp_path, capsys):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.yaml").write_text((run / "config.yaml").read_text())
    (tmp_path / "empty.txt").write_text("\n  \n")
    g_run = make_run(tmp_path / "global", ["model.pattern=G", "model.attention.max_len=32"])
    cases = [
        ([str(tmp_path / "missing"), "--prompt", "a"], "does not exist"),
        ([str(tmp_path / "bare"), "--prompt", "a"], "has no checkpoint"),
        ([str(run), "--prompt", "a", "--step", "7"], "has steps 2"),
        ([str(run), "--prompt", "a", "--top-p", "0"], "top_p"),
        ([str(run), "--prompt", "a", "--top-p", "1.5"], "top_p"),
        ([str(run), "--prompt", "a", "--temperature", "-0.5"], "temperature"),
        ([str(run), "--prompt", "a", "--top-k", "-1"], "top_k"),
        ([str(run), "--prompt", "a", "--max-new-tokens", "0"], "max-new-tokens"),
        ([str(run), "--prompt-file", str(tmp_path / "empty.txt")], "holds no prompt"),
        ([str(run), "--prompt-file", str(tmp_path / "nope.txt")], "not found"),
        ([str(run)], "--prompt"),
        ([str(run), "--prompt", "a", "--ema"], "ema_decay"),
        ([str(g_run), "--prompt", "x" * 20, "--max-new-tokens", "12"], "model.attention.max_len"),
    ]
    for args, msg in cases:
        assert main(["sample", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("lmtrain: error: ") and err.count("\n") == 1 and msg in err, (args, err)
