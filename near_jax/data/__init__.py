"""Data: text sources → tokens → packed fixed-length rows → per-host batches.

documents   sources (files, globs, .bin token files), document identities, the train/val split
tokenizer   byte, SentencePiece and Hugging Face tokenizers behind one interface
packing     packs documents into rows with `segment_ids` and `positions`
pipeline    the deterministic grain pipeline: shards, host iterators, global batches

The package re-exports the pipeline's entry points (`data.make_iterator`,
`data.to_global_batch`, `data.FEATURES`) and the document helpers callers use.
"""

from near_jax.data.documents import Documents, list_documents, split_documents
from near_jax.data.packing import PackIterDataset
from near_jax.data.pipeline import (
    FEATURES,
    HostIterator,
    make_iterator,
    shard_dataset,
    to_global_batch,
)
from near_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "FEATURES",
    "Documents",
    "HostIterator",
    "PackIterDataset",
    "Tokenizer",
    "list_documents",
    "load_tokenizer",
    "make_iterator",
    "shard_dataset",
    "split_documents",
    "to_global_batch",
]
