"""Tests of near_jax.data.packing: documents packed into rows of segments."""

import grain
import numpy as np

from near_jax import data
from near_jax.data import pipeline


def test_finite_stream_pads_with_zero_weight():
    docs = [np.arange(n, dtype=np.int32) + 10 for n in (5, 30, 7)]
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    rows = list(data.PackIterDataset(ds, row_len=17, pad_id=99))
    assert len(rows) == 3
    batch = pipeline._features({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    # row 3: the last token of document 2, document 3 (7 tokens), 9 padding tokens
    assert rows[-1]["segment_ids"].tolist() == [1] + [2] * 7 + [0] * 9
    assert rows[-1]["positions"].tolist()[:8] == [0, *range(7)]
    assert batch["weights"][-1].tolist() == [0] + [1] * 6 + [0] * 9
    assert np.all(batch["inputs"][-1][8:] == 99) and np.all(batch["segment_ids"][-1][8:] == 0)
    np.testing.assert_array_equal(
        np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows]),
        np.concatenate(docs),
    )
    assert batch["weights"][0].tolist() == [1] * 4 + [0] + [1] * 11  # doc 1 ends at 4
