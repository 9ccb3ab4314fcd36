"""Synthetic tasks: every label checked by rebuilding the answer from the sequence alone; exact
lengths; determinism by seed; the trainer batch layout; a task source's training batches resume and shard."""

import re

import numpy as np
import pytest

from lmtrain.data.batch import BATCH_FIELDS
from lmtrain.data.config import DataConfig, SourceConfig
from lmtrain.data.pipeline import make_train_iterator
from lmtrain.data.tasks import TASKS, example, make_batch, make_task
from lmtrain.data.tokenizer import ByteTokenizer

LENGTHS = [128, 200, 1000]
SEEDS_INDICES = [(0, 0), (0, 1), (3, 7), (11, 2)]


def answer_of(ex) -> np.ndarray:
    return ex.tokens_N[1:][ex.answer_T]


def text(tokens) -> str:
    return ByteTokenizer().decode(tokens)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("seed,index", SEEDS_INDICES)
def test_passkey_labels(length, seed, index):
    for depth in (None, 0.0, 0.5, 1.0):
        ex = example(make_task("passkey", depth=depth), seed, index, length)
        s = text(ex.tokens_N)
        needles = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", s)
        assert len(needles) == 1 and needles[0][0] == needles[0][1]
        key = needles[0][0]
        assert len(key) == 5 and s.endswith("What is the pass key? The pass key is " + key)
        assert text(answer_of(ex)) == key
        assert ex.answer_T[-5:].all() and ex.answer_T.sum() == 5  # the answer is the last 5 targets
        if depth is not None:  # the needle sits at that fraction of the filler
            before, after = s.index("The pass key is"), len(s) - s.index("\nWhat is the pass key?")
            filler = len(s) - len(" The pass key is 00000. Remember it. 00000 is the pass key. ") - after
            assert abs((before - 1) - depth * filler) <= 1


def test_passkey_intro_corpus_filler_and_other_tokenizer():
    ex = example(make_task("passkey", intro=True, digits=7), 0, 0, 600)
    s = text(ex.tokens_N)
    assert s.startswith("There is an important info hidden") and len(text(answer_of(ex))) == 7
    corpus = "def f(x):\n    return x + 1\n" * 10
    ex = example(make_task("passkey", filler_text=corpus), 0, 0, 400)
    assert "return x + 1" in text(ex.tokens_N) and "grass" not in text(ex.tokens_N)

    class Shifted(ByteTokenizer):  # another tokenizer: ids are bytes + 3
        def encode(self, s):
            return [b + 3 for b in s.encode()]

    task = make_task("passkey", tokenizer=Shifted())
    ex = example(task, 5, 5, 300)
    decoded = bytes(int(i) - 3 for i in ex.tokens_N).decode()
    key = re.search(r"The pass key is (\d+)\.", decoded).group(1)
    assert bytes(int(i) - 3 for i in answer_of(ex)).decode() == key


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("seed,index", SEEDS_INDICES)
@pytest.mark.parametrize("placement", ["uniform", "end"])
def test_mqar_labels(length, seed, index, placement):
    n = 12
    ex = example(make_task("mqar", num_pairs=n, placement=placement), seed, index, length)
    tok = ex.tokens_N
    pairs = dict(zip(tok[0:2 * n:2].tolist(), tok[1:2 * n:2].tolist()))
    assert len(pairs) == n  # distinct keys
    queried = []
    for t in np.flatnonzero(ex.answer_T):
        key, value = int(tok[t]), int(tok[t + 1])  # input at t is the query key; target t the value
        assert t >= 2 * n and pairs[key] == value
        queried.append(key)
    assert sorted(queried) == sorted(pairs)  # every key queried once
    rest = np.ones(len(tok), bool)
    rest[:2 * n] = False
    for t in np.flatnonzero(ex.answer_T):
        rest[t:t + 2] = False
    assert (tok[rest] == ord(" ")).all()  # everything else is noise
    if placement == "end":
        assert ex.answer_T[-1] and np.flatnonzero(ex.answer_T)[0] == length + 1 - 2 * n  # packed at the end


@pytest.mark.parametrize("length", LENGTHS + [3])
@pytest.mark.parametrize("seed,index", SEEDS_INDICES)
def test_induction_labels(length, seed, index):
    ex = example(make_task("induction"), seed, index, length)
    tok = ex.tokens_N
    triggers = np.flatnonzero(tok == ord("#"))
    assert len(triggers) == 2 and triggers[1] == length - 1  # once inside, once as the last input
    assert answer_of(ex).tolist() == [tok[triggers[0] + 1]] and ex.answer_T.sum() == 1


def test_induction_depth():
    for depth, where in ((0.0, 0), (1.0, 997)):
        tok = example(make_task("induction", depth=depth), 0, 0, 1000).tokens_N
        assert np.flatnonzero(tok == ord("#"))[0] == where


@pytest.mark.parametrize("length", LENGTHS + [16])
@pytest.mark.parametrize("seed,index", SEEDS_INDICES)
def test_selective_copy_labels(length, seed, index):
    ex = example(make_task("selective_copy", num_tokens=8), seed, index, length)
    tok = ex.tokens_N
    sep = int(np.flatnonzero(tok == ord("|"))[0])
    content = [t for t in tok[:sep] if t != ord(".")]
    assert len(content) == 8 and answer_of(ex).tolist() == content
    assert sep + 8 == length and ex.answer_T.sum() == 8


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_by_seed_exact_length(name):
    task = make_task(name)
    a, b = example(task, 4, 9, 300), example(task, 4, 9, 300)
    np.testing.assert_array_equal(a.tokens_N, b.tokens_N)
    np.testing.assert_array_equal(a.answer_T, b.answer_T)
    assert not np.array_equal(a.tokens_N, example(task, 5, 9, 300).tokens_N)
    assert not np.array_equal(a.tokens_N, example(task, 4, 10, 300).tokens_N)
    for n in (task.min_length(), task.min_length() + 1, 777):
        ex = example(task, 0, 0, n)
        assert ex.tokens_N.shape == (n + 1,) and ex.answer_T.shape == (n,) and ex.answer_T.any()
        assert ex.tokens_N.dtype == np.int32 and 0 <= ex.tokens_N.min() and ex.tokens_N.max() < 259
    with pytest.raises(ValueError, match="too short"):
        example(task, 0, 0, task.min_length() - 1)


@pytest.mark.parametrize("name", list(TASKS))
def test_batch_layout_matches_trainer(name):
    task = make_task(name)
    batch = make_batch(task, 1, 10, 3, 256)
    assert set(batch) == set(BATCH_FIELDS)
    for k in BATCH_FIELDS:
        assert batch[k].shape == (3, 256) and batch[k].dtype == np.int32
    for i in range(3):
        ex = example(task, 1, 10 + i, 256)
        np.testing.assert_array_equal(batch["inputs"][i], ex.tokens_N[:-1])
        np.testing.assert_array_equal(batch["targets"][i], ex.tokens_N[1:])
        np.testing.assert_array_equal(batch["loss_mask"][i], ex.answer_T)
    assert (batch["segment_ids"] == 1).all() and (batch["positions"] == np.arange(256)).all()
    assert make_batch(task, 1, 10, 3, 256, loss_on="all")["loss_mask"].all()


def _task_data(global_batch_size=4):
    """A data config whose only source is the mqar task, as training reads it (one example per row)."""
    return DataConfig(sources=(SourceConfig(kind="task", task="mqar"),), seq_len=64,
                      global_batch_size=global_batch_size, seed=2)


def test_training_task_batches_resume_and_shard():
    it = make_train_iterator(_task_data())
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    after = next(it)
    resumed = make_train_iterator(_task_data())
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["inputs"], after["inputs"])
    halves = [make_train_iterator(_task_data(), process_index=p, process_count=2) for p in range(2)]
    for batch in first:  # process p makes rows p, p + 2, ... of the global batch
        joined = np.stack([next(h)["inputs"] for h in halves], axis=1).reshape(batch["inputs"].shape)
        np.testing.assert_array_equal(joined, batch["inputs"])
    with pytest.raises(ValueError, match="divisible"):
        make_train_iterator(_task_data(global_batch_size=3), process_count=2)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("passkee")
    with pytest.raises(ValueError, match="num_pairs"):
        make_task("mqar", num_pairs=100)
    with pytest.raises(ValueError, match="depth"):
        make_task("passkey", depth=1.5)
