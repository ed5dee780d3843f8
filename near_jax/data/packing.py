"""Concat-then-split packing of token documents into fixed-length rows (checkpointable)."""

from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
    """Concatenates variable-length int32 token arrays and cuts rows of `row_len` tokens.

    Each row is a dict of `tokens`, `segment_ids` (1, 2, ... per piece of a document in the
    row; 0 = padding) and `positions` (0, 1, ... within each piece). Only the final row of a
    finite parent is padded (with pad_id). The state is {"parent": state before the
    document the next row starts in, "offset": tokens of it already used}: JSON-safe.
    """

    def __init__(self, parent: grain.IterDataset, *, row_len: int, pad_id: int):
        super().__init__(parent)
        self._row_len = row_len
        self._pad_id = pad_id

    def __iter__(self) -> grain.DatasetIterator:
        return PackIterator(self._parent.__iter__(), row_len=self._row_len, pad_id=self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(row_len={self._row_len})"


class PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, *, row_len: int, pad_id: int):
        super().__init__(parent)
        self._row_len = row_len
        self._pad_id = pad_id
        self._arange = np.arange(row_len, dtype=np.int32)
        self._doc: np.ndarray | None = None  # the document being cut into rows
        self._doc_state: Any = None  # parent state just before that document
        self._offset = 0  # tokens of it already emitted

    def __next__(self) -> dict[str, np.ndarray]:
        n_row = self._row_len
        tokens = np.full(n_row, self._pad_id, np.int32)
        segment_ids = np.zeros(n_row, np.int32)
        positions = np.zeros(n_row, np.int32)
        fill = segment = 0
        while fill < n_row:
            if self._doc is None:
                state = self._parent.get_state()
                try:
                    doc = next(self._parent)
                except StopIteration:
                    if fill == 0:
                        raise
                    break
                if len(doc) == 0:
                    continue
                self._doc, self._doc_state, self._offset = doc, state, 0
            n = min(n_row - fill, len(self._doc) - self._offset)
            segment += 1
            tokens[fill : fill + n] = self._doc[self._offset : self._offset + n]
            segment_ids[fill : fill + n] = segment
            positions[fill : fill + n] = self._arange[:n]
            fill += n
            self._offset += n
            if self._offset == len(self._doc):
                self._doc = None
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    def get_state(self) -> dict[str, Any]:
        if self._doc is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc, self._offset = None, 0
        if state["offset"]:
            self._doc_state = self._parent.get_state()
            self._doc = next(self._parent)
            self._offset = int(state["offset"])

    def __str__(self) -> str:
        return f"PackIterator(row_len={self._row_len})"
