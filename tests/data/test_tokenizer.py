"""Byte and sentencepiece tokenizers: round trips, special ids, loading, the training command."""

import pickle

import pytest

from lmtrain.data import tokenizer_cli
from lmtrain.data.config import TokenizerConfig
from lmtrain.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)

SAMPLES = ["", "hello world", "  def f(x):\n\treturn x  # é漢字 😀\r\n\n", " leading space", "\x00\x7f", "a" * 300]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * 2, 'squared', i ** 2)\n",
] * 20


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("spm") / "bpe", vocab_size=320, model_type="bpe")


def test_byte_round_trip_and_special_ids():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    for s in SAMPLES:
        ids = tok.encode(s)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == s
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id, tok.pad_id]) == "hi"
    assert tok.decode([0xFF]) == "\ufffd"


def test_sentencepiece_bpe_round_trip(bpe_model):
    tok = load_tokenizer(TokenizerConfig(kind="sentencepiece", path=str(bpe_model)))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.vocab_size == 320
    for s in SAMPLES + CORPUS[:3]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(CORPUS[1])) < len(CORPUS[1].encode()) / 2  # it learned something
    again = pickle.loads(pickle.dumps(tok))  # grain workers receive the tokenizer pickled
    assert again.encode(CORPUS[0]) == tok.encode(CORPUS[0])


def test_sentencepiece_unigram_round_trip(tmp_path):
    model = train_sentencepiece(CORPUS[:3], tmp_path / "uni", vocab_size=300, model_type="unigram")
    tok = SentencePieceTokenizer(model)
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_missing_model_names_path_and_command(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="lmtrain tokenizer train") as err:
        load_tokenizer(TokenizerConfig(kind="sentencepiece", path=str(missing)))
    assert str(missing) in str(err.value)


def test_cli_trains_from_a_text_source(tmp_path, capsys):
    for i, text in enumerate(CORPUS[:3]):
        (tmp_path / f"{i}.py").write_text(text * 5)
    (tmp_path / "empty.py").write_text("  \n")
    out = tmp_path / "tok" / "small"
    argv = ["tokenizer", "train", "--source", "text", "--path", str(tmp_path / "*.py"), "--vocab-size", "300",
            "--type", "bpe", "--out", str(out), "--heldout-fraction", "0"]
    assert tokenizer_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}.model" in printed and "from 4 documents" in printed and "1 empty" in printed
    tok = SentencePieceTokenizer(f"{out}.model")
    assert tok.decode(tok.encode("x = 1")) == "x = 1"
