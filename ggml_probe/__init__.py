"""ggml-probe: what did quantization do to my model?

The library is usable without the CLI::

    from ggml_probe.models import inspect_gguf, quantize_ladder, resolve_model
"""

__version__ = "0.1.0"
