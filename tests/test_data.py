"""Tests for quantlab.data: deterministic, disjoint corpora that ship with the pinned environment."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab import data

# -----------------------------------------------------------------------------
# Code corpus (numpy's sources)


def _bucket(path: str) -> int:
    """The split rule as documented, re-derived independently of the module."""
    return int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") % 1000


def test_code_splits_are_disjoint_and_cover_every_source_file():
    splits = {s: data.code_files(s) for s in data.CODE_SPLITS}
    all_files = [p for files in splits.values() for p in files]
    assert len(all_files) == len(set(all_files))
    root = data.code_root()
    expected = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "tests" not in p.relative_to(root).parts
        and p.name != "__config__.py"
        and not p.name.startswith("_distributor_init")
    )
    assert sorted(all_files) == expected
    for split, files in splits.items():
        assert files == sorted(files)
        assert files, f"split {split} is empty"


def test_code_split_rule_is_the_documented_hash():
    for split in data.CODE_SPLITS:
        for path in data.code_files(split):
            b = _bucket(path)
            want = "validation" if b < 30 else "test" if b < 60 else "train"
            assert split == want, path


def test_code_corpus_excludes_tests_and_build_files():
    for split in data.CODE_SPLITS:
        for path in data.code_files(split):
            assert "tests/" not in path and not path.startswith("tests")
            assert not path.endswith("__config__.py")


def test_code_corpus_is_the_files_with_headers():
    root = data.code_root()
    corpus = data.code_corpus("validation")
    files = data.code_files("validation")
    assert corpus.count(b"# file: ") >= len(files)
    pos = 0
    for path in files:
        header = b"# file: " + path.encode() + b"\n"
        start = corpus.index(header, pos)
        body = (root / path).read_bytes()
        assert corpus[start + len(header) : start + len(header) + len(body)] == body
        pos = start + len(header) + len(body)
    # the validation split is small enough for a seconds-long evaluation, big enough to mean something
    assert 20_000 < len(corpus) < 200_000
    assert len(data.code_corpus("train")) > 2_000_000


def test_code_corpus_is_deterministic():
    data.code_corpus.cache_clear()
    first = data.code_corpus("test")
    data.code_corpus.cache_clear()
    assert data.code_corpus("test") == first


@pytest.mark.parametrize("bad", ["valid", "TRAIN", ""])
def test_bad_split_names_raise(bad):
    with pytest.raises(ValueError, match="split must be one of"):
        data.code_corpus(bad)
    with pytest.raises(ValueError, match="split must be one of"):
        data.prose_corpus(bad)


def test_split_must_be_a_string():
    with pytest.raises(TypeError, match="split must be a str"):
        data.code_files(0)


# -----------------------------------------------------------------------------
# Prose corpus (CPython's pydoc topics)


def test_prose_splits_share_no_document():
    docs = {s: data.prose_documents(s) for s in data.PROSE_SPLITS}
    for s, d in docs.items():
        assert len(d) == len(set(d)), f"duplicate documents inside {s}"
        assert len(d) > 50
    for a in data.PROSE_SPLITS:
        for b in data.PROSE_SPLITS:
            if a < b:
                assert not set(docs[a]) & set(docs[b]), (a, b)


def test_evaluation_shares_no_64_byte_substring_with_calibration_or_train():
    n = data.OVERLAP_WINDOW
    assert n == 64

    def windows(split: str) -> set[bytes]:
        out: set[bytes] = set()
        for doc in data.prose_documents(split):
            b = doc.encode("utf-8")
            out |= {b[i : i + n] for i in range(len(b) - n + 1)}
        return out

    evaluation = windows("evaluation")
    assert not evaluation & windows("calibration")
    assert not evaluation & windows("train")


def test_prose_documents_read_like_prose():
    for split in data.PROSE_SPLITS:
        for doc in data.prose_documents(split):
            assert "\n" not in doc
            assert len(doc) >= 80 and len(doc.split()) >= 12
            assert doc[-1] in ".:?!)"
            assert "::=" not in doc and ">>>" not in doc and "+---" not in doc
            assert not doc.startswith(("Changed in version", "New in version", "Note:"))


def test_prose_corpus_is_documents_joined_and_sized_for_cpu_evaluation():
    for split in data.PROSE_SPLITS:
        assert data.prose_corpus(split) == "\n\n".join(data.prose_documents(split))
    assert 20_000 < len(data.prose_corpus("evaluation")) < 80_000
    assert 20_000 < len(data.prose_corpus("calibration")) < 80_000
    assert len(data.prose_corpus("train")) > len(data.prose_corpus("evaluation"))


def test_prose_split_rule_is_the_documented_hash():
    for split in data.PROSE_SPLITS:
        for doc in data.prose_documents(split):
            b = int.from_bytes(hashlib.sha256(doc.encode("utf-8")).digest()[:8], "big") % 100
            want = "calibration" if b < 20 else "evaluation" if b < 40 else "train"
            assert split == want


def test_prose_is_deterministic():
    first = {s: data.prose_corpus(s) for s in data.PROSE_SPLITS}
    data._all_prose_documents.cache_clear()
    assert {s: data.prose_corpus(s) for s in data.PROSE_SPLITS} == first


def test_clean_paragraph_keeps_prose_and_drops_the_rest():
    prose = [
        "The quick brown fox jumps over the lazy dog, and then it keeps on",
        "running into the forest until the pre-",
        "existing path ends at the river [2].",
    ]
    assert data.clean_paragraph(prose) == (
        "The quick brown fox jumps over the lazy dog, and then it keeps on running into the "
        "forest until the pre-existing path ends at the river."
    )
    bullet = ["* A bulleted item is prose too when it is long enough to be a sentence", "  of its own."]
    assert data.clean_paragraph(bullet).startswith("A bulleted item")
    assert data.clean_paragraph(["Heading of a section", "********************"]) is None
    assert data.clean_paragraph(["+-----+-----+", "| a   | b   |", "+-----+-----+"]) is None
    code = ["   def f(x):", "       return x + 1"]
    assert data.clean_paragraph(code) is None
    grammar = ['   if_stmt ::= "if" assignment_expression ":" suite and many more words here to be long']
    assert data.clean_paragraph(grammar) is None
    version = ["Changed in version 3.7: the behaviour of this thing changed in a way that is long enough."]
    assert data.clean_paragraph(version) is None
    assert data.clean_paragraph(["too short."]) is None


# -----------------------------------------------------------------------------
# Fingerprints


def test_corpus_fingerprint_is_stable_and_distinguishes_kinds():
    fps = {k: data.corpus_fingerprint(k) for k in ("code", "prose", "all")}
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in fps.values())
    assert len(set(fps.values())) == 3
    assert data.corpus_fingerprint("all") == fps["all"]
    with pytest.raises(ValueError, match="kind must be one of"):
        data.corpus_fingerprint("everything")


def test_fingerprint_is_length_prefixed():
    # moving a byte from one part to the next must change the digest
    a = data._sha256_of_parts([("x", b"ab"), ("y", b"c")])
    b = data._sha256_of_parts([("x", b"a"), ("y", b"bc")])
    assert a != b


# -----------------------------------------------------------------------------
# Calibration batches


def test_calibration_batches_deterministic_per_seed():
    tokens = torch.arange(1000)
    a = data.calibration_batches(tokens, 8, 16, seed=3)
    b = data.calibration_batches(tokens, 8, 16, seed=3)
    c = data.calibration_batches(tokens, 8, 16, seed=4)
    assert a.shape == (8, 16) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@settings(max_examples=40, deadline=None)
@given(
    n_tokens=st.integers(1, 300),
    seq_len=st.integers(1, 64),
    n_samples=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_calibration_batches_are_contiguous_windows(n_tokens, seq_len, n_samples, seed):
    tokens = torch.arange(n_tokens, dtype=torch.int32) * 7  # distinct values reveal the offsets
    if n_tokens < seq_len:
        with pytest.raises(ValueError, match="fewer than seq_len"):
            data.calibration_batches(tokens, n_samples, seq_len, seed)
        return
    batch = data.calibration_batches(tokens, n_samples, seq_len, seed)
    assert batch.shape == (n_samples, seq_len)
    starts = batch[:, 0] // 7
    assert bool((starts >= 0).all()) and bool((starts + seq_len <= n_tokens).all())
    for row, start in zip(batch, starts, strict=True):
        assert torch.equal(row, tokens[start : start + seq_len].long())


def test_calibration_batches_bad_input():
    with pytest.raises(TypeError, match="tokens"):
        data.calibration_batches([1, 2, 3], 1, 2)
    with pytest.raises(TypeError, match="integer token ids"):
        data.calibration_batches(torch.ones(10), 1, 2)
    with pytest.raises(ValueError, match="1-D"):
        data.calibration_batches(torch.ones(2, 10, dtype=torch.long), 1, 2)
    with pytest.raises(ValueError, match="n_samples"):
        data.calibration_batches(torch.arange(10), 0, 2)
    with pytest.raises(ValueError, match="seq_len"):
        data.calibration_batches(torch.arange(10), 1, 0)
    with pytest.raises(TypeError, match="seed"):
        data.calibration_batches(torch.arange(10), 1, 2, seed=1.5)
