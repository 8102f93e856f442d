"""Weight-level analysis of GGUF files: dequantization, quantization error against a reference, dumps.

Submodules import NumPy only; llama.cpp's libggml is loaded on the first dequantization.
"""

from .dequant import GGUFTensors, can_dequantize, dequantize_bytes, quantize_rows
from .dump import DumpResult, dump_tensors
from .error import WeightReport, compare_weights, format_report, parse_patterns, select_tensors
from .sensitivity import SensitivityReport, format_sensitivity, neuron_sensitivity

__all__ = [
    "GGUFTensors", "can_dequantize", "dequantize_bytes", "quantize_rows", "DumpResult", "dump_tensors",
    "WeightReport", "compare_weights", "format_report", "parse_patterns", "select_tensors",
    "SensitivityReport", "format_sensitivity", "neuron_sensitivity",
]
