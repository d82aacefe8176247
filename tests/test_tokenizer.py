"""Tests for quantlab.models.tokenizer: byte map, pre-tokenizer, BPE merges, special tokens, SmolLM2 vocab."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.assets import smollm2_gguf_path
from quantlab.models.tokenizer import PRETOKENIZER_PATTERNS, BPETokenizer, bytes_to_unicode, pretokenize

BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]


def byte_tokenizer(merges: list[str], extra: list[str] = (), special: list[str] = (), pre: str = "smollm"):
    """A tokenizer whose vocabulary holds all 256 byte characters, the merge results and ``extra``."""
    tokens = list(special) + BYTE_CHARS + [m.replace(" ", "") for m in merges] + list(extra)
    return BPETokenizer(list(dict.fromkeys(tokens)), merges, special_tokens=special, pre=pre)


# ----------------------------------------------------------------------------------------------
# Byte map and pre-tokenizer


def test_bytes_to_unicode_is_a_printable_bijection() -> None:
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in m.values())
    assert m[ord("a")] == "a" and m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and m[0] == chr(256)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Hello world", ["Hello", " world"]),
        ("it's 12 o'clock", ["it", "'s", " ", "1", "2", " o", "'", "clock"]),
        # Digits are split off first, so the spaces before "1" end their piece and stay together.
        ("x  =  1.5", ["x", " ", " =", "  ", "1", ".", "5"]),
        ("a\n\nb", ["a", "\n", "\n", "b"]),
        ("end   ", ["end", "   "]),
        ("café ½", ["café", " ", "½"]),
    ],
)
def test_pretokenize_smollm_examples(text: str, words: list[str]) -> None:
    assert pretokenize(text) == words


def test_pretokenize_gpt2_keeps_digit_runs() -> None:
    assert pretokenize("in 2024", PRETOKENIZER_PATTERNS["gpt2"]) == ["in", " 2024"]


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_pretokenize_partitions_the_text(text: str) -> None:
    words = pretokenize(text)
    assert "".join(words) == text and all(words)


# ----------------------------------------------------------------------------------------------
# BPE on a tiny vocabulary


def test_merges_apply_by_rank_not_by_position() -> None:
    tok = byte_tokenizer(["b c", "a b"])
    assert tok.token_strings(tok.encode("abc")) == ["a", "bc"]
    tok = byte_tokenizer(["a b", "b c"])
    assert tok.token_strings(tok.encode("abc")) == ["ab", "c"]


def test_merges_chain_and_repeat() -> None:
    tok = byte_tokenizer(["a a", "aa aa", "Ġ aaaa"])
    assert tok.token_strings(tok.encode("aaaaa aaaa")) == ["aaaa", "a", "Ġaaaa"]
    # Pairs merge left to right without overlap: "aaa" -> "aa" + "a".
    assert tok.token_strings(tok.encode("aaa")) == ["aa", "a"]


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_round_trip_any_text_with_a_byte_complete_vocabulary(text: str) -> None:
    tok = byte_tokenizer(["Ġ t", "h e", "Ġt he", "i n"], special=["<|im_start|>", "<|im_end|>"])
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))


def test_special_tokens_are_matched_literally_unless_disabled() -> None:
    tok = byte_tokenizer(["i m"], special=["<|im_start|>", "<|im"])
    assert tok.encode("x<|im_start|>y") == [tok.token_to_id["x"], 0, tok.token_to_id["y"]]
    assert tok.encode("<|im") == [1]  # the shorter special token still matches on its own
    literal = tok.encode("<|im_start|>", special=False)
    assert 0 not in literal and tok.decode(literal) == "<|im_start|>"


def test_missing_byte_raises_or_is_dropped() -> None:
    tokens = [c for c in BYTE_CHARS if c != bytes_to_unicode()[0x04]]
    tok = BPETokenizer(tokens, [], pre="gpt2")
    with pytest.raises(ValueError, match="0x04"):
        tok.encode("a\x04b")
    assert tok.decode(tok.encode("a\x04b", errors="ignore")) == "ab"
    with pytest.raises(ValueError, match="0x04"):  # the lossy result above must not be cached
        tok.encode("a\x04b")
    with pytest.raises(ValueError, match="errors"):
        tok.encode("a", errors="replace")


def test_decode_replaces_cut_utf8_and_rejects_bad_ids() -> None:
    tok = byte_tokenizer([])
    ids = tok.encode("é")  # two bytes, two tokens
    assert len(ids) == 2 and tok.decode(ids[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="token id"):
        tok.decode([len(tok.tokens)])


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="pre="):
        BPETokenizer(["a"], [], pre="nope")
    with pytest.raises(ValueError, match="merge #0"):
        BPETokenizer(["a"], ["abc"])
    with pytest.raises(ValueError, match="special token"):
        BPETokenizer(["a"], [], special_tokens=["<s>"])
    with pytest.raises(TypeError, match="text"):
        byte_tokenizer([]).encode(b"bytes")


def test_from_gguf_metadata_reads_specials_and_ids() -> None:
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": ["<|endoftext|>", *BYTE_CHARS, "ab"],
        "tokenizer.ggml.token_type": [3] + [1] * 257,
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    tok = BPETokenizer.from_gguf_metadata(meta)
    assert tok.special_tokens == {"<|endoftext|>": 0} and tok.eos_id == 0
    assert tok.encode("ab<|endoftext|>", add_bos=True) == [0, 257, 0]
    with pytest.raises(ValueError, match="gpt2"):
        BPETokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})


# ----------------------------------------------------------------------------------------------
# SmolLM2's vocabulary (needs the GGUF file)

needs_smollm2 = pytest.mark.skipif(not smollm2_gguf_path().is_file(), reason="SmolLM2 GGUF not fetched")


@pytest.fixture(scope="module")
def smol() -> BPETokenizer:
    from quantlab.models.smollm2 import load_tokenizer

    return load_tokenizer()


@pytest.mark.smollm2
@needs_smollm2
@pytest.mark.parametrize(
    ("text", "ids", "pieces"),
    [
        # Ids read off tokenizer.ggml.tokens: "Hello" is 19556 and "Ġworld" is 905.
        ("Hello world", [19556, 905], ["Hello", "Ġworld"]),
        (
            "The capital of France is",
            [504, 3575, 282, 4649, 314],
            ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"],
        ),
        (" 2024", [216, 34, 32, 34, 36], ["Ġ", "2", "0", "2", "4"]),
        ("<|im_start|>user\n", [1, 4093, 198], ["<|im_start|>", "user", "Ċ"]),
    ],
)
def test_smollm2_known_encodings(smol: BPETokenizer, text: str, ids: list[int], pieces: list[str]) -> None:
    assert smol.encode(text) == ids
    assert smol.token_strings(ids) == pieces
    assert smol.decode(ids) == text


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_vocab_metadata(smol: BPETokenizer) -> None:
    assert smol.vocab_size == 49152 and smol.pre == "smollm"
    assert (smol.bos_id, smol.eos_id) == (1, 2)
    assert smol.tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(smol.special_tokens) == 17


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_round_trip_unicode(smol: BPETokenizer) -> None:
    # Characters whose UTF-8 bytes all have a byte token (21 bytes lack one; tested below).
    chars = bytes_to_unicode()

    def representable(c: str) -> bool:
        return all(chars[b] in smol.token_to_id for b in c.encode("utf-8"))

    @settings(max_examples=80, deadline=None)
    @given(st.text(alphabet=st.characters(exclude_categories=("Cs",)).filter(representable), max_size=60))
    def check(text: str) -> None:
        ids = smol.encode(text)
        assert smol.decode(ids) == text
        assert all(0 <= i < smol.vocab_size for i in ids)

    check()


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_missing_control_byte_is_reported(smol: BPETokenizer) -> None:
    # 0x04 is one of the 21 bytes SmolLM2's vocabulary lacks (llama.cpp drops them).
    with pytest.raises(ValueError, match="0x04"):
        smol.encode("a\x04")
    assert smol.encode("a\x04", errors="ignore") == smol.encode("a")
