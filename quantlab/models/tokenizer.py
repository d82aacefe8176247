"""Byte-level BPE tokenizer (GPT-2 style) built from the vocabulary stored in a GGUF file.

Encoding a string takes four steps::

    text --split on special tokens--> "<|im_start|>", "user\\nHi 42", ...
         --pre-tokenize (regex)-----> "user", "\\n", "Hi", " ", "4", "2"        (words)
         --bytes -> printable chars-> "user", "Ċ", "Hi", "Ġ", "4", "2"          (GPT-2 byte map)
         --BPE merges by rank-------> token strings --vocab--> token ids

* **Byte map.** GPT-2 byte-level BPE works on the UTF-8 bytes of the text, but stores every byte as a
  printable unicode character so that vocabularies and merges are readable text: the 188 printable
  Latin-1 bytes map to themselves, the 68 others (space, control bytes, ...) to ``chr(256 + n)``.
  A space becomes ``"Ġ"`` and a newline ``"Ċ"``.
* **Pre-tokenizer.** Words never merge across the boundaries of a regex split. The GGUF metadata key
  ``tokenizer.ggml.pre`` names the split llama.cpp uses; for SmolLM2 it is ``"smollm"``: first every
  digit is isolated (``\\p{N}``), then the GPT-2 pattern splits each piece into contractions, letters
  with an optional leading space, digits, punctuation runs and whitespace runs.
* **BPE.** Starting from single byte-characters, the adjacent pair whose merge has the lowest rank
  (its index in ``tokenizer.ggml.merges``) is merged, everywhere in the word, until no pair has a
  merge rule. Results are cached per word, since natural text repeats words a lot.
* **Special tokens** (``token_type`` CONTROL or USER_DEFINED, e.g. ``<|im_start|>``) are matched
  literally before pre-tokenization, so a chat template can be written as plain text.

SmolLM2's vocabulary lacks 21 of the 256 byte-characters (e.g. bytes 0x04, 0x13, 0xF1). llama.cpp
drops such bytes silently; here :meth:`BPETokenizer.encode` raises ``ValueError`` unless
``errors="ignore"`` asks for llama.cpp's behaviour.

References:
    Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units", ACL 2016 (BPE).
    Radford et al., "Language Models are Unsupervised Multitask Learners", 2019 (byte-level BPE,
    the GPT-2 pre-tokenizer pattern and byte map).
    Gerganov et al., llama.cpp ``src/llama-vocab.cpp`` (the per-model pre-tokenizer patterns,
    ``LLAMA_VOCAB_PRE_TYPE_SMOLLM``) and the GGUF specification (``tokenizer.ggml.*`` keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import regex

__all__ = [
    "PRETOKENIZER_PATTERNS",
    "BPETokenizer",
    "bytes_to_unicode",
    "pretokenize",
]

# llama.cpp's patterns, keyed by the GGUF ``tokenizer.ggml.pre`` value. Each pattern is applied in
# turn to the pieces the previous one produced; text a pattern does not match stays a piece.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKENIZER_PATTERNS: dict[str, tuple[str, ...]] = {
    "gpt2": (_GPT2_PATTERN,),
    "smollm": (r"\p{N}", _GPT2_PATTERN),
    "starcoder": (r"\p{N}", _GPT2_PATTERN),
}

# GGUF token types (llama.cpp ``llama_token_type``): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to the character with the same code;
    the remaining 68 bytes map, in increasing order, to ``chr(256)``, ``chr(257)``, ...

    Returns:
        A dict with 256 entries ``byte -> one-character string``.

    >>> m = bytes_to_unicode()
    >>> m[ord("A")], m[ord(" ")], m[ord("\\n")]
    ('A', 'Ġ', 'Ċ')
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    n_shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n_shifted)
            n_shifted += 1
    return mapping


def pretokenize(text: str, patterns: Sequence[str] = PRETOKENIZER_PATTERNS["smollm"]) -> list[str]:
    """Split text into words with a cascade of regular expressions (llama.cpp's ``unicode_regex_split``).

    Each pattern splits every piece produced by the previous one; matches and the unmatched text
    between them both become pieces, so ``"".join(pretokenize(text)) == text`` always.

    Args:
        text: the input string (no special tokens).
        patterns: the regex cascade, e.g. ``PRETOKENIZER_PATTERNS["smollm"]``.

    Returns:
        The list of words.

    >>> pretokenize("Hello world, it's 2024!")
    ['Hello', ' world', ',', ' it', "'s", ' ', '2', '0', '2', '4', '!']
    """
    pieces = [text] if text else []
    for pattern in patterns:
        compiled = _compile(pattern)
        split: list[str] = []
        for piece in pieces:
            start = 0
            for match in compiled.finditer(piece):
                if match.start() > start:
                    split.append(piece[start : match.start()])
                if match.end() > match.start():
                    split.append(match.group())
                start = match.end()
            if start < len(piece):
                split.append(piece[start:])
        pieces = split
    return pieces


@lru_cache(maxsize=16)
def _compile(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


class BPETokenizer:
    """A byte-level BPE tokenizer: ``encode(text) -> ids`` and ``decode(ids) -> text``.

    Build it from a GGUF file's metadata with :meth:`from_gguf_metadata`, or directly from a
    vocabulary and merge list (handy for tests).

    Args:
        tokens: the vocabulary; ``tokens[i]`` is token ``i``'s string in the GPT-2 byte alphabet.
        merges: merge rules ``"left right"`` in priority order (rank = index; lower merges first).
        special_tokens: token strings matched literally in the input (e.g. ``"<|im_start|>"``) and
            decoded literally.
        pre: the pre-tokenizer name, a key of :data:`PRETOKENIZER_PATTERNS`.
        bos_id: beginning-of-sequence id, if any (not added automatically).
        eos_id: end-of-sequence id, if any.

    >>> tok = BPETokenizer(["a", "b", "Ġ", "ab", "Ġab"], ["a b", "Ġ ab"], pre="gpt2")
    >>> tok.encode("ab ab")
    [3, 4]
    >>> tok.decode([3, 4])
    'ab ab'
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        special_tokens: Sequence[str] = (),
        pre: str = "smollm",
        bos_id: int | None = None,
        eos_id: int | None = None,
    ) -> None:
        if pre not in PRETOKENIZER_PATTERNS:
            raise ValueError(
                f"pre={pre!r} is not a known pre-tokenizer; valid: {sorted(PRETOKENIZER_PATTERNS)}"
            )
        self.tokens: list[str] = list(tokens)
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}
        if len(self.token_to_id) != len(self.tokens):
            raise ValueError("tokens must not contain duplicates")
        self.merge_ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            parts = merge.split(" ")
            if len(parts) != 2:
                raise ValueError(f"merge #{rank} must be two symbols separated by one space, got {merge!r}")
            self.merge_ranks.setdefault((parts[0], parts[1]), rank)
        for name, tid in (("bos_id", bos_id), ("eos_id", eos_id)):
            if tid is not None and not 0 <= tid < len(self.tokens):
                raise ValueError(f"{name}={tid} is outside the vocabulary [0, {len(self.tokens)})")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pre = pre
        self.patterns = PRETOKENIZER_PATTERNS[pre]
        self.special_tokens: dict[str, int] = {}
        for s in special_tokens:
            if s not in self.token_to_id:
                raise ValueError(f"special token {s!r} is not in the vocabulary")
            self.special_tokens[s] = self.token_to_id[s]
        # Longest first, so that a special token that is a prefix of another never wins.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = (
            regex.compile("|".join(regex.escape(s) for s in alternatives)) if alternatives else None
        )
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> BPETokenizer:
        """Build the tokenizer from GGUF metadata (``tokenizer.ggml.*`` keys).

        Args:
            metadata: the GGUF key/value metadata, with ``tokenizer.ggml.model == "gpt2"``, ``tokens``,
                ``merges``, and optionally ``token_type``, ``pre``, ``bos_token_id``, ``eos_token_id``.

        Returns:
            The tokenizer.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model must be 'gpt2' (byte-level BPE) for this tokenizer, got {model!r}"
            )
        tokens = list(metadata["tokenizer.ggml.tokens"])
        token_type = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        special = [
            t
            for t, k in zip(tokens, token_type, strict=True)
            if k in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        ]
        return cls(
            tokens,
            list(metadata["tokenizer.ggml.merges"]),
            special_tokens=special,
            pre=str(metadata.get("tokenizer.ggml.pre", "gpt2")),
            bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
        )

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self.tokens)

    def _bpe(self, word: str) -> list[str]:
        """Apply the merges to one word given in the byte alphabet; return its symbols."""
        symbols = list(word)
        while len(symbols) > 1:
            ranks = [self.merge_ranks.get(pair, -1) for pair in zip(symbols, symbols[1:], strict=False)]
            best = min((r for r in ranks if r >= 0), default=-1)
            if best < 0:
                break
            left, right = symbols[ranks.index(best)], symbols[ranks.index(best) + 1]
            # Merge every occurrence of the best pair, left to right (non-overlapping).
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _encode_word(self, word: str, errors: str) -> tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        mapped = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
        ids: list[int] = []
        dropped = False
        for symbol in self._bpe(mapped):
            tid = self.token_to_id.get(symbol)
            if tid is not None:
                ids.append(tid)
                continue
            # A symbol without a token can only be a single byte the vocabulary lacks.
            for ch in symbol:
                if ch in self.token_to_id:
                    ids.append(self.token_to_id[ch])
                    continue
                if errors == "strict":
                    byte = self._byte_decoder[ch]
                    raise ValueError(
                        f"text contains the byte 0x{byte:02x} (in word {word!r}) which this vocabulary "
                        f"cannot represent; pass errors='ignore' to drop it as llama.cpp does"
                    )
                dropped = True
        result = tuple(ids)
        if not dropped:  # a lossy result depends on `errors`, so only exact encodings are cached
            self._cache[word] = result
        return result

    def encode(
        self,
        text: str,
        *,
        add_bos: bool = False,
        special: bool = True,
        errors: Literal["strict", "ignore"] = "strict",
    ) -> list[int]:
        """Encode a string into token ids.

        Args:
            text: the string.
            add_bos: prepend ``bos_id`` (SmolLM2's GGUF says ``add_bos_token = False``).
            special: match special tokens such as ``<|im_start|>`` literally (as llama.cpp's
                ``parse_special``); if False they are encoded as ordinary text.
            errors: ``"strict"`` raises ``ValueError`` for a byte the vocabulary lacks, ``"ignore"``
                drops it.

        Returns:
            The token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if errors not in ("strict", "ignore"):
            raise ValueError(f"errors must be 'strict' or 'ignore', got {errors!r}")
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_id")
            ids.append(self.bos_id)
        start = 0
        chunks: list[tuple[str, bool]] = []  # (text, is_special)
        if special and self._special_re is not None:
            for match in self._special_re.finditer(text):
                chunks.append((text[start : match.start()], False))
                chunks.append((match.group(), True))
                start = match.end()
        chunks.append((text[start:], False))
        for chunk, is_special in chunks:
            if is_special:
                ids.append(self.special_tokens[chunk])
                continue
            for word in pretokenize(chunk, self.patterns):
                ids.extend(self._encode_word(word, errors))
        return ids

    def decode(self, ids: Sequence[int] | Any) -> str:
        """Decode token ids into a string.

        Bytes that do not form valid UTF-8 (e.g. a sequence cut in the middle of a character) become
        U+FFFD, so decoding never fails on a valid id.

        Args:
            ids: token ids (a list, or a 1-D tensor / array of ints).

        Returns:
            The decoded text.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = bytearray()
        for tid in ids:
            if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < len(self.tokens):
                raise ValueError(f"token id {tid!r} is not an int in [0, {len(self.tokens)})")
            token = self.tokens[tid]
            if token in self.special_tokens:
                out += token.encode("utf-8")
            else:
                out += bytes(self._byte_decoder[ch] for ch in token)
        return out.decode("utf-8", errors="replace")

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings of ``ids`` (byte alphabet, e.g. ``"Ġworld"``), for inspection."""
        return [self.tokens[i] for i in ids]
