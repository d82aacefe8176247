"""Models the labs quantize: a from-scratch Llama, its byte-level BPE tokenizer, and SmolLM2 loading.

Usage::

    from quantlab.models import load_smollm2, generate_text
    model, tokenizer = load_smollm2()           # needs `make setup` (the GGUF file)
    generate_text(model, tokenizer, "The capital of France is", max_new_tokens=8)

See :mod:`quantlab.models.llama` (architecture), :mod:`quantlab.models.tokenizer` (BPE) and
:mod:`quantlab.models.smollm2` (GGUF loading, chat template). The names below are imported on first
use, so ``import quantlab.models.<submodule>`` never pays for the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KVCache": "llama",
    "Llama": "llama",
    "LlamaConfig": "llama",
    "BPETokenizer": "tokenizer",
    "chat_prompt": "smollm2",
    "generate_text": "smollm2",
    "load_smollm2": "smollm2",
    "load_tokenizer": "smollm2",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quantlab.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"quantlab.models.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
