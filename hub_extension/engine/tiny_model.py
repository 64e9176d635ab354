"""Build a random-weight Llama and a byte-level BPE tokenizer offline.

No PyPI package ships a causal LM and tests and CI never download, so the project builds its own model: a
tokenizer trained on the standard library's docstrings, a chat template, and a `LlamaForCausalLM` with random
weights. Its output is gibberish; it exists to exercise shapes, counts, batching and the wire protocol.

    python -m hub_extension.engine.tiny_model OUTDIR [--params tiny|30M|300M]

A build is reused when OUTDIR already holds one made with the same preset.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

# Presets: name -> LlamaConfig overrides. "tiny" keeps the test-suite fast; "30M" is the benchmark model
# (about the 27.5M model measured in docs/platform.md); "300M" is for a GPU run.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "30M": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=9,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "300M": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
}
VOCAB_SIZE = 2048
MAX_POSITIONS = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MARKER = "tiny_model.json"


def _corpus() -> list[str]:
    """A few hundred KB of English and code from standard-library docstrings: local, deterministic."""
    import importlib
    import inspect

    texts: list[str] = []
    for name in [
        "json",
        "os",
        "re",
        "collections",
        "asyncio",
        "pathlib",
        "argparse",
        "textwrap",
        "functools",
        "itertools",
        "typing",
        "logging",
        "subprocess",
        "string",
        "datetime",
        "decimal",
        "email",
    ]:
        mod = importlib.import_module(name)
        if mod.__doc__:
            texts.append(mod.__doc__)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                texts.append(doc)
    return texts


def build_tokenizer(outdir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(outdir)
    return fast


def build(outdir: str | os.PathLike, params: str = "tiny", seed: int = 0) -> Path:
    """Build (or reuse) the model in `outdir` and return its path."""
    if params not in PRESETS:
        raise ValueError(f"unknown preset {params!r}; choose one of {', '.join(PRESETS)}")
    out = Path(outdir)
    marker = out / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("params") == params:
        return out
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pad = tokenizer.convert_tokens_to_ids("<|pad|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=eot,
        eos_token_id=[im_end, eot],
        pad_token_id=pad,
        tie_word_embeddings=False,
        **PRESETS[params],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=pad)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    marker.write_text(json.dumps({"params": params, "num_parameters": n}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--params", default="tiny", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    path = build(args.outdir, args.params)
    info = json.loads((path / _MARKER).read_text())
    print(f"{path} ({info['num_parameters'] / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
