"""What a run's data holds, for `lmtrain check`: documents per source and split, estimated tokens.

    for row in survey(cfg.data, tokenizer, stages):   # opens every source, as training would
        print(row.name, row.train_docs, row.heldout_docs, row.est_train_tokens)

Token counts are estimated from the first `sample` training documents of each source (their mean
token count times the number of documents). Task sources are generated per step and have no count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lmtrain.data import sources as sources_lib
from lmtrain.data.config import DataConfig, SourceConfig, StageConfig
from lmtrain.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SourceSurvey:
    name: str  # e.g. "data.sources[0] (jsonl data/*.jsonl)"
    train_docs: int | None  # None for task sources
    heldout_docs: int | None
    est_train_tokens: float | None


def _sources(cfg: DataConfig, stages: Sequence[StageConfig]) -> list[tuple[str, SourceConfig]]:
    out = [(f"data.sources[{j}]", src) for j, src in enumerate(cfg.sources)]
    out += [(f"stages[{i}].sources[{j}]", src) for i, stage in enumerate(stages) for j, src in enumerate(stage.sources)]
    return out


def survey(cfg: DataConfig, tokenizer: Tokenizer, stages: Sequence[StageConfig] = (), sample: int = 32
           ) -> list[SourceSurvey]:
    """One row per source of the run (data.sources, then each stage's); raises DataError like training."""
    rows = []
    for where, src in _sources(cfg, stages):
        label = f"{where} ({src.kind}{' ' + src.path if src.path else ''}{' ' + src.task if src.task else ''})"
        if src.kind == "task":
            rows.append(SourceSurvey(label, None, None, None))
            continue
        source = sources_lib.open_source(src)
        train = sources_lib.split_indices(source, cfg.heldout_fraction, heldout=False)
        heldout = len(source) - len(train)
        if not len(train):
            raise sources_lib.DataError(f"{label} has no training documents ({len(source)} in all, {heldout} held "
                                        f"out at data.heldout_fraction={cfg.heldout_fraction}); add data or lower it")
        lengths = [len(tokenizer.encode(source.read(int(i)).text)) + 2 for i in train[:sample]]  # + bos, eos
        estimate = sum(lengths) / len(lengths) * len(train) if lengths else 0.0
        rows.append(SourceSurvey(label, len(train), heldout, estimate))
    return rows
