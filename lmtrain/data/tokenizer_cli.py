"""`lmtrain tokenizer train`: trains a sentencepiece model on a source's training split."""

from __future__ import annotations

import argparse
import collections
import time
import typing

from lmtrain.data.source_config import SourceConfig, SourceKind
from lmtrain.data.sources import iter_texts
from lmtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `tokenizer train` to the CLI's subparsers."""
    parser = subparsers.add_parser("tokenizer", help="tokenizer tools")
    commands = parser.add_subparsers(dest="tokenizer_command", required=True)
    train = commands.add_parser("train", help="train a sentencepiece model on a document source",
                                description="Writes OUT.model and OUT.vocab; set tokenizer.kind=sentencepiece "
                                "and tokenizer.path=OUT.model to use it.")
    train.add_argument("--source", choices=[k for k in typing.get_args(SourceKind) if k != "task"], default="stdlib",
                       help="source kind (default: stdlib, the built-in corpus)")
    train.add_argument("--path", default="", help="file glob for text/jsonl/parquet/arrayrecord sources")
    train.add_argument("--field", default="text", help="jsonl key / parquet column holding the text")
    train.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default: 4096)")
    train.add_argument("--type", choices=("bpe", "unigram"), default="bpe", help="model type (default: bpe)")
    train.add_argument("--out", required=True, help="output prefix, e.g. tokenizers/stdlib4k")
    train.add_argument("--no-byte-fallback", action="store_true",
                       help="map unknown characters to <unk> instead of UTF-8 byte pieces")
    train.add_argument("--max-lines", type=int, default=2_000_000, help="train on at most this many lines")
    train.add_argument("--heldout-fraction", type=float, default=0.01,
                       help="leave out the held-out split (use data.heldout_fraction of your run config)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    source = SourceConfig(kind=args.source, path=args.path, field=args.field)
    source.validate()
    counts = collections.Counter()
    start = time.perf_counter()
    model = train_sentencepiece(iter_texts(source, args.heldout_fraction, counts), args.out, args.vocab_size,
                                model_type=args.type, byte_fallback=not args.no_byte_fallback,
                                max_lines=args.max_lines)
    tok = SentencePieceTokenizer(model)
    print(f"wrote {model} (vocab {tok.vocab_size}, {args.type}) from {counts['documents']} documents "
          f"in {time.perf_counter() - start:.1f}s; skipped {counts['empty']} empty, "
          f"{counts['malformed']} malformed; {counts['undecodable']} had undecodable bytes")
    print(f"use it with: tokenizer.kind=sentencepiece tokenizer.path={model}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmtrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
