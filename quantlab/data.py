"""Text corpora that ship with every installation: numpy's sources (code) and CPython's docs (prose).

Nothing is downloaded. Both corpora are read from files that the pinned environment installs
identically everywhere, split deterministically, and fingerprinted so a results cache can tell when
the text changed.

**Code** (:func:`code_corpus`, bytes, for the byte-level tiny GPT): the ``.py`` files of the installed
``numpy`` package (pinned to ``numpy==2.4.6`` in the lock file), found with
``importlib.util.find_spec("numpy")`` without importing numpy. Excluded: everything under a ``tests``
folder (numpy's test suites are long runs of near-identical asserts, not library code) and the two
files a build or a distributor writes (``__config__.py`` records the compiler of the machine that
built the wheel; ``_distributor_init*.py`` differs between distributors). The files are split **by
file**, so no function is half in training and half in validation: the bucket of a file is
``int(sha256(relative posix path)[:8 bytes]) mod 1000``; buckets ``[0, 30)`` are validation,
``[30, 60)`` test, the rest train (about 3 % / 3 % / 94 % of the files). A split is its files'
bytes, in sorted path order, each file preceded by a one-line ``# file: <path>`` header.

**Prose** (:func:`prose_corpus`, str, for SmolLM2 perplexity and calibration): the documentation
topics that ship with CPython, ``pydoc_data.topics.topics`` (the text ``help("if")`` shows: the
Language Reference's chapters as plain English). They depend only on the Python version, pinned to
3.11.7. Each topic is cleaned to prose (code examples, tables, grammar productions and reference
lines dropped; wrapped lines joined into paragraphs); each paragraph is one *document*. Documents are
deduplicated and assigned to ``calibration`` / ``evaluation`` / ``train`` by hashing their text, so
the splits share no document, and a further filter removes from ``evaluation`` any document that
shares a 64-byte substring with ``calibration`` or ``train`` (sentences that CPython's docs repeat in
several topics), so no evaluation text was seen during calibration or quantization-aware training.

Sizes (numpy 2.4.6, Python 3.11.7): code train/validation/test 217/6/12 files, 4.02 MB/65 kB/290 kB;
prose calibration/evaluation/train 165/153/566 paragraphs, 44k/39k/140k characters.

References:
    numpy 2.4.6 source distribution, https://numpy.org (BSD-3-Clause).
    CPython 3.11.7 ``Lib/pydoc_data/topics.py`` (PSF License), generated from the Python Language
    Reference.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from pathlib import Path

import torch

from quantlab._checks import check_int

__all__ = [
    "CODE_SPLITS",
    "OVERLAP_WINDOW",
    "PROSE_SPLITS",
    "byte_windows",
    "calibration_batches",
    "clean_paragraph",
    "code_corpus",
    "code_files",
    "code_root",
    "corpus_fingerprint",
    "prose_corpus",
    "prose_documents",
]

CODE_SPLITS: tuple[str, ...] = ("train", "validation", "test")
_CODE_PACKAGE = "numpy"
_CODE_BUCKETS = 1000
_CODE_VALIDATION = range(0, 30)
_CODE_TEST = range(30, 60)


def _check_split(split: object, valid: tuple[str, ...], name: str = "split") -> str:
    if not isinstance(split, str):
        raise TypeError(f"{name} must be a str, one of {valid}, got {split!r} of type {type(split).__name__}")
    if split not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {split!r}")
    return split


def _bucket(text: str, n_buckets: int) -> int:
    """A stable hash bucket of ``text`` (sha256, not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % n_buckets


# -----------------------------------------------------------------------------
# Code: numpy's Python sources


def code_root() -> Path:
    """The folder of the installed numpy package, located without importing numpy."""
    spec = importlib.util.find_spec(_CODE_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {_CODE_PACKAGE!r} package is not installed (it is pinned in the lock)")
    return Path(spec.origin).resolve().parent


def _code_split_of(relative_path: str) -> str:
    bucket = _bucket(relative_path, _CODE_BUCKETS)
    if bucket in _CODE_VALIDATION:
        return "validation"
    if bucket in _CODE_TEST:
        return "test"
    return "train"


def _excluded(relative: Path) -> bool:
    return (
        "tests" in relative.parts
        or relative.name == "__config__.py"
        or relative.name.startswith("_distributor_init")
    )


@functools.lru_cache(maxsize=1)
def _all_code_files() -> tuple[tuple[str, str], ...]:
    """``(relative posix path, split)`` for every corpus file, sorted by path."""
    root = code_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if not _excluded(relative):
            out.append((relative.as_posix(), _code_split_of(relative.as_posix())))
    return tuple(sorted(out))


def code_files(split: str) -> list[str]:
    """The relative paths (posix, sorted) of the numpy source files in ``split``.

    Args:
        split: one of :data:`CODE_SPLITS`.

    Returns:
        e.g. ``["_core/numeric.py", ...]`` relative to :func:`code_root`.
    """
    split = _check_split(split, CODE_SPLITS)
    return [path for path, s in _all_code_files() if s == split]


@functools.lru_cache(maxsize=len(CODE_SPLITS))
def code_corpus(split: str) -> bytes:
    """The bytes of a code split: each file as ``b"# file: <path>\\n"`` followed by its raw bytes.

    Args:
        split: one of :data:`CODE_SPLITS`.

    Returns:
        The concatenation over the split's files in sorted path order (byte-level: no decoding).
    """
    split = _check_split(split, CODE_SPLITS)
    root = code_root()
    parts = []
    for path in code_files(split):
        data = (root / path).read_bytes()
        if data and not data.endswith(b"\n"):
            data += b"\n"
        parts.append(b"# file: " + path.encode("utf-8") + b"\n" + data)
    return b"".join(parts)


# -----------------------------------------------------------------------------
# Prose: CPython's documentation topics, cleaned to paragraphs


PROSE_SPLITS: tuple[str, ...] = ("calibration", "evaluation", "train")
_PROSE_BUCKETS = 100
_PROSE_CALIBRATION = range(0, 20)
_PROSE_EVALUATION = range(20, 40)
#: Length of the substrings that :func:`prose_documents` forbids ``evaluation`` to share with the others.
OVERLAP_WINDOW = 64

_HEADING_UNDERLINE = re.compile(r"[*=\-~^\"#]{3,}")
_BULLET = re.compile(r"^(\*|-|\d+\.|\(\d+\))\s+")
_FOOTNOTE = re.compile(r" ?\[\d+\]")
# Paragraphs that are the same few words in every topic (version notes, admonition labels): not prose.
_BOILERPLATE_PREFIXES = (
    "Changed in version",
    "New in version",
    "Added in version",
    "Deprecated since version",
    "See also:",
    "Note:",
    "Warning:",
    "Example:",
    "For example:",
)


def _blocks(text: str) -> list[list[str]]:
    """Split plain text into blocks of consecutive non-blank lines."""
    blocks, block = [], []
    for line in text.split("\n") + [""]:
        if line.strip():
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    return blocks


def _join_lines(lines: list[str]) -> str:
    """Unwrap lines into one paragraph; a line ending in a hyphen after a letter joins without a space."""
    text = ""
    for line in lines:
        line = line.strip()
        if text.endswith("-") and len(text) > 1 and text[-2].isalpha():
            text += line
        else:
            text = f"{text} {line}" if text else line
    return text


def clean_paragraph(block: list[str]) -> str | None:
    """One block of the pydoc text as a single line of prose, or None if it is not prose.

    Dropped: headings (a line underlined with ``*``, ``=``, ``-`` ...), tables, grammar productions
    (``::=``), interactive sessions (``>>>``, ``(Pdb)``), code (continuation lines indented differently
    from the first), boilerplate (version notes, "Note:" labels), and anything that does not read like
    a sentence: shorter than 80 characters or 12 words, not starting with a capital letter or a quoted
    name, not ending in ``. : ? ! )``, or less than 80 % letters and spaces. Kept paragraphs are
    unwrapped into one line, bullets and footnote markers ``[1]`` removed.

    Args:
        block: consecutive non-blank lines of one topic.

    Returns:
        The cleaned paragraph, or None.

    >>> clean_paragraph(["Heading", "======="]) is None
    True
    """
    if len(block) >= 2 and _HEADING_UNDERLINE.fullmatch(block[-1].strip()):
        return None
    if any(line.lstrip().startswith(("+", "|")) for line in block):
        return None  # a table
    indents = [len(line) - len(line.lstrip()) for line in block]
    first = block[0].strip()
    bullet = _BULLET.match(first)
    if bullet:
        # A bullet's continuation lines are indented past its marker.
        if any(i <= indents[0] for i in indents[1:]):
            return None
        first = first[bullet.end() :]
    elif any(i != indents[0] for i in indents[1:]):
        return None  # ragged indentation: code or a grammar
    text = _FOOTNOTE.sub("", " ".join(_join_lines([first] + block[1:]).split()))
    if text.startswith(_BOILERPLATE_PREFIXES) or "::=" in text or ">>>" in text or "(Pdb)" in text:
        return None
    if len(text) < 80 or len(text.split()) < 12 or text[-1] not in ".:?!)":
        return None
    if not (text[0].isupper() or text[0] in '"“'):
        return None
    if sum(c.isalpha() or c == " " for c in text) < 0.8 * len(text):
        return None
    return text


@functools.lru_cache(maxsize=1)
def _all_prose_documents() -> tuple[tuple[str, str], ...]:
    """``(text, split)`` for every cleaned, deduplicated paragraph, topics in sorted order."""
    from pydoc_data.topics import topics  # ships with CPython; a dict {topic name: plain text}

    seen: set[str] = set()
    docs: list[str] = []
    for name in sorted(topics):
        for block in _blocks(topics[name]):
            text = clean_paragraph(block)
            if text is not None and text not in seen:
                seen.add(text)
                docs.append(text)
    split_of = {}
    for text in docs:
        bucket = _bucket(text, _PROSE_BUCKETS)
        if bucket in _PROSE_CALIBRATION:
            split_of[text] = "calibration"
        elif bucket in _PROSE_EVALUATION:
            split_of[text] = "evaluation"
        else:
            split_of[text] = "train"
    # Evaluation must not contain text seen in calibration or training: drop any evaluation paragraph
    # sharing a 64-byte substring with another split (a repeated sentence across topics).
    seen_windows: set[bytes] = set()
    for text in docs:
        if split_of[text] != "evaluation":
            seen_windows |= byte_windows(text, OVERLAP_WINDOW)
    out = []
    for text in docs:
        if split_of[text] == "evaluation" and not byte_windows(text, OVERLAP_WINDOW).isdisjoint(seen_windows):
            continue
        out.append((text, split_of[text]))
    return tuple(out)


def byte_windows(text: str, n: int) -> set[bytes]:
    """Every ``n``-byte substring of the UTF-8 encoding of ``text`` (the empty set if it is shorter)."""
    data = text.encode("utf-8")
    return {data[i : i + n] for i in range(len(data) - n + 1)}


def prose_documents(split: str) -> list[str]:
    """The paragraphs (one line each) of a prose split, in the pydoc topics' order.

    A paragraph's split is ``sha256(text) mod 100``: ``[0, 20)`` calibration, ``[20, 40)`` evaluation,
    the rest train; evaluation then loses every paragraph that shares a 64-byte substring with
    calibration or train. Take the first ``k`` documents for a shorter evaluation.

    Args:
        split: one of :data:`PROSE_SPLITS`.

    Returns:
        A list of paragraphs (str).
    """
    split = _check_split(split, PROSE_SPLITS)
    return [text for text, s in _all_prose_documents() if s == split]


def prose_corpus(split: str) -> str:
    """A prose split as one string: its paragraphs joined by blank lines (``"\\n\\n"``).

    Depends only on the Python version (pinned to 3.11.7), whose ``pydoc_data.topics`` it reads.

    Args:
        split: ``"calibration"`` (for GPTQ/AWQ/SmoothQuant statistics), ``"evaluation"`` (for perplexity)
            or ``"train"`` (for quantization-aware training).

    Returns:
        English text, about 40-130 thousand characters.
    """
    return "\n\n".join(prose_documents(split))


# -----------------------------------------------------------------------------
# Calibration batches


def calibration_batches(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from a token stream (GPTQ's calibration sampler).

    Each window starts at a uniformly random offset in ``[0, len(tokens) - seq_len]``, drawn from a
    ``torch.Generator`` seeded with ``seed``, so the same call returns the same batch everywhere.
    Windows may overlap when the stream is short.

    Args:
        tokens: ``(n_tokens,)`` integer token ids (e.g. the tokenized ``prose_corpus("calibration")``,
            or ``code_corpus("train")`` as bytes for the tiny GPT), ``n_tokens >= seq_len``.
        n_samples: number of windows, >= 1.
        seq_len: tokens per window, >= 1.
        seed: seed of the sampler.

    Returns:
        ``(n_samples, seq_len)`` long tensor on ``tokens``' device.

    >>> calibration_batches(torch.arange(10), n_samples=2, seq_len=3, seed=0).shape
    torch.Size([2, 3])
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a 1-D torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    n_samples = check_int(n_samples, "n_samples")
    seq_len = check_int(seq_len, "seq_len")
    seed = check_int(seed, "seed")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if tokens.numel() < seq_len:
        raise ValueError(f"tokens has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_samples,), generator=generator)  # (n_samples,)
    offsets = torch.arange(seq_len)  # (seq_len,)
    return tokens[(starts[:, None] + offsets).to(tokens.device)].long()  # (n_samples, seq_len)


# -----------------------------------------------------------------------------
# Fingerprints


def _sha256_of_parts(parts: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in parts:
        # Length-prefixed so that moving bytes between parts changes the digest.
        h.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def corpus_fingerprint(kind: str = "all") -> str:
    """A sha256 hex digest of the corpus text, for results caches and checkpoint metadata.

    Args:
        kind: ``"code"`` (numpy's sources, every split), ``"prose"`` (CPython's docs, every split) or
            ``"all"`` (both).

    Returns:
        64 hex characters; changes when any split's text or the split assignment changes.
    """
    kind = _check_split(kind, ("code", "prose", "all"), name="kind")
    parts: list[tuple[str, bytes]] = []
    if kind in ("code", "all"):
        parts += [(f"code/{s}", code_corpus(s)) for s in CODE_SPLITS]
    if kind in ("prose", "all"):
        parts += [(f"prose/{s}", prose_corpus(s).encode("utf-8")) for s in PROSE_SPLITS]
    return _sha256_of_parts(parts)
