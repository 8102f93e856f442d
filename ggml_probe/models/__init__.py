"""Getting models: the store, the hub, conversion, quantization, and reading GGUF files.

Public names are imported lazily so `import ggml_probe.models` stays cheap.
"""

_EXPORTS = {
    "inspect_gguf": "ggufinfo",
    "GGUFInfo": "ggufinfo",
    "quantize_ladder": "quantize",
    "ladder_path": "quantize",
    "resolve_model": "store",
    "demo_model_path": "store",
    "list_local_models": "store",
    
    "convert_hf_to_gguf": "convert",
    "fetch_gguf": "fetch",
    "list_repo_gguf": "fetch",
    "normalize_quant": "quant_types",
    "QUANT_TYPES": "quant_types",
    "write_llama_gguf": "synthetic",
    "LlamaShape": "synthetic",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
