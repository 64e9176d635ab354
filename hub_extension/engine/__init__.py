"""Models: the registry, the generation and embedding backends, and the `ModelManager` that holds them.

This package knows nothing of HTTP, users or keys; the `/v1` handlers are where those meet the models.
Heavy imports (torch, transformers) happen when a model loads, not when this package is imported.
"""

from .generation import Delta, EngineError, Generation, SamplingParams
from .manager import ModelInfo, ModelManager
from .registry import ConfigError, ModelSpec, Registry, load_registry, parse_registry

__all__ = [
    "ConfigError",
    "Delta",
    "EngineError",
    "Generation",
    "ModelInfo",
    "ModelManager",
    "ModelSpec",
    "Registry",
    "SamplingParams",
    "load_registry",
    "parse_registry",
]
