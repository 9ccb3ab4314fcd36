"""The trainer's batch: what every data iterator yields and the train step consumes."""

from __future__ import annotations

from typing import TypedDict

import numpy as np


class Batch(TypedDict):
    """int32 [rows, length] arrays; one packed row (or task example) per row (a single row: [length])."""

    inputs: np.ndarray  # token ids fed to the model
    targets: np.ndarray  # the next token of the same document (what input t predicts)
    segment_ids: np.ndarray  # 1, 2, 3, ... per document piece within the row (or stream); 0 = padding
    positions: np.ndarray  # position within the piece, restarting at 0 at each piece
    loss_mask: np.ndarray  # 1 where the target counts in the loss, 0 on padding (and non-answer task tokens)


BATCH_FIELDS: tuple[str, ...] = tuple(Batch.__annotations__)
