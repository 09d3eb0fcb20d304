"""Megatron-Core indexed datasets (`<prefix>.bin` + `<prefix>.idx`), one document per sequence.

Layout as Megatron's `tools/preprocess_data.py` writes it without `--split-sentences`: each document
is one sequence with EOD appended, and the token dtype is `DType.optimal_dtype(vocab_size)` (uint16
for GPT-2's 50257). Megatron is imported inside the functions so tokenization works without it.
"""

from __future__ import annotations

import struct
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
    lengths, dtype = read_index(prefix)
    if not lengths.sum():
        return -1
    return int(np.memmap(f"{prefix}.bin", dtype=dtype, mode="r").max())


# Megatron-Core's `.idx` layout (megatron/core/datasets/indexed_dataset.py, _IndexWriter/_IndexReader):
# 9-byte magic, <Q version (1), <B dtype code, <Q sequence count, <Q document count, then int32 sequence
# lengths, int64 sequence byte pointers, int64 document indices (and int8 modes if multimodal).
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def read_index(prefix: str | Path) -> tuple[np.ndarray, np.dtype]:
    """(tokens per sequence, token dtype) of `prefix.{bin,idx}`, after checking that both files are whole.

    Reads the `.idx` itself instead of through Megatron's reader, which on a damaged file fails
    later and deeper (`cannot mmap an empty file`, `buffer is smaller than requested size`, an
    assertion on the header) without naming the file. ValueError names the file and what is wrong.
    """
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    idx_size = idx_path.stat().st_size
    remake = "re-create it (python -m mtp_plugin.data prepare, or Megatron-LM's tools/preprocess_data.py)"
    if idx_size < _HEADER_BYTES:
        raise ValueError(f"{idx_path} is {idx_size} bytes, shorter than an index header; {remake}")
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if header[:9] != _INDEX_MAGIC:
        raise ValueError(f"{idx_path} is not a Megatron index file (no MMIDIDX header); {remake}")
    (version,) = struct.unpack("<Q", header[9:17])
    code = header[17]
    num_sequences, num_documents = struct.unpack("<QQ", header[18:34])
    if version != 1 or code not in _DTYPES:
        raise ValueError(f"{idx_path}: unknown index version {version} or dtype code {code}; {remake}")
    expected = _HEADER_BYTES + num_sequences * (4 + 8) + num_documents * 8
    if idx_size not in (expected, expected + num_sequences):  # + int8 modes of a multimodal index
        raise ValueError(
            f"{idx_path} is {idx_size} bytes but its header ({num_sequences} sequences, {num_documents - 1} "
            f"documents) needs {expected}: the file is truncated or damaged; {remake}"
        )
    lengths = np.fromfile(idx_path, dtype=np.int32, count=num_sequences, offset=_HEADER_BYTES).astype(
        np.int64
    )
    dtype = np.dtype(_DTYPES[code])
    bin_size = bin_path.stat().st_size
    if bin_size != int(lengths.sum()) * dtype.itemsize:
        raise ValueError(
            f"{bin_path} is {bin_size} bytes but {idx_path} indexes {int(lengths.sum())} {dtype.name} tokens "
            f"({int(lengths.sum()) * dtype.itemsize} bytes): the pair does not match or one is truncated; {remake}"
        )
    return lengths, dtype
