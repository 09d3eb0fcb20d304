"""Megatron-Core indexed datasets (`<prefix>.bin` + `<prefix>.idx`), one document per sequence.

Layout as Megatron's `tools/preprocess_data.py` writes it without `--split-sentences`: each document
is one sequence with EOD appended, and the token dtype is `DType.optimal_dtype(vocab_size)` (uint16
for GPT-2's 50257). Megatron is imported inside the functions so tokenization works without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mtp_plugin.data.tokenizer import GPT2_EOD_ID, GPT2_VOCAB_SIZE


def _indexed_dataset_module():
    # megatron.core's import warns about missing Transformer Engine/Apex and its own deprecations,
    # none of which concern reading or writing data files.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def write_indexed_dataset(
    prefix: str | Path,
    docs_token_ids: Iterable[Sequence[int]],
    *,
    eod_id: int = GPT2_EOD_ID,
    vocab_size: int = GPT2_VOCAB_SIZE,
) -> tuple[int, int]:
    """Write `prefix.bin`/`prefix.idx`, appending `eod_id` to every document.

    Returns (num_documents, num_tokens), tokens counted with their EOD.
    """
    indexed_dataset = _indexed_dataset_module()
    dtype = indexed_dataset.DType.optimal_dtype(vocab_size)
    prefix = str(prefix)
    builder = indexed_dataset.IndexedDatasetBuilder(indexed_dataset.get_bin_path(prefix), dtype=dtype)
    num_documents = num_tokens = 0
    for ids in docs_token_ids:
        doc_tokens = np.append(np.asarray(ids, dtype=np.int64), eod_id)
        # Casting to uint16 would silently wrap an id >= vocab_size instead of failing.
        if doc_tokens.min() < 0 or doc_tokens.max() >= vocab_size:
            raise ValueError(
                f"document {num_documents} has token ids outside [0, {vocab_size}); "
                "pass the vocab_size of the tokenizer that produced them"
            )
        builder.add_document(doc_tokens, [doc_tokens.size])
        num_documents += 1
        num_tokens += doc_tokens.size
    builder.finalize(indexed_dataset.get_idx_path(prefix))
    return num_documents, num_tokens


def read_indexed_dataset(prefix: str | Path) -> list[np.ndarray]:
    """Token ids of every document in `prefix.{bin,idx}` (EOD included), one array per document.

    Meant for checks and small sets; training reads through Megatron's IndexedDataset/GPTDataset.
    """
    indexed_dataset = _indexed_dataset_module()
    dataset = indexed_dataset.IndexedDataset(str(prefix), mmap=True)
    # One sequence per document is what write_indexed_dataset produces; anything else would make
    # "document i" ambiguous.
    if not np.array_equal(dataset.document_indices, np.arange(len(dataset) + 1)):
        raise ValueError(f"{prefix}: documents span several sequences; read it with IndexedDataset")
    # Copies: the items are views of a memory map that IndexedDataset.__del__ closes, and a view that
    # outlives it segfaults on access.
    return [np.array(dataset[i]) for i in range(len(dataset))]


def max_token_id(prefix: str | Path) -> int:
    """The largest token id in `prefix.bin` (-1 if it holds none), to check data against a vocabulary.

    One memory-mapped pass over the file at memory (or disk) bandwidth; nothing is loaded into RAM.
    """
    indexed_dataset = _indexed_dataset_module()
    dataset = indexed_dataset.IndexedDataset(str(prefix), mmap=True)
    dtype = dataset.index.dtype
    del dataset
    bin_path = indexed_dataset.get_bin_path(str(prefix))
    if Path(bin_path).stat().st_size == 0:
        return -1
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    return int(tokens.max())
