"""The registry of llama.cpp file types (ftypes) by their user-facing names (Q4_K_M, Q8_0, F16, ...).

Names and ids come from gguf-py's LlamaFileType, which mirrors llama.h's `enum llama_ftype`;
a test checks every entry against the constants of the installed llama-cpp-python.
"""

from __future__ import annotations

import difflib

import gguf

from ..errors import UnknownQuant

# ftype ids llama.cpp can no longer write, or that are not real targets.
_NOT_TARGETS = {"GUESSED"}


def _user_name(member_name: str) -> str:
    if member_name == "ALL_F32":
        return "F32"
    return member_name.removeprefix("MOSTLY_")


QUANT_TYPES: dict[str, int] = {
    _user_name(m.name): int(m.value) for m in gguf.LlamaFileType if m.name not in _NOT_TARGETS
}
_BY_ID = {v: k for k, v in QUANT_TYPES.items()}

# Types whose quantizer refuses to run without an importance matrix (llama-quant.cpp's rule).
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"}

# Unquantized types: requantizing *to* these from a quantized source only dequantizes.
FLOAT_TYPES = {"F32", "F16", "BF16"}


def normalize_quant(name: str) -> str:
    """Canonical name for a user-typed quant ('q4_k_m' → 'Q4_K_M'); UnknownQuant lists valid ones."""
    key = name.strip().upper().replace("-", "_")
    if key in QUANT_TYPES:
        return key
    close = difflib.get_close_matches(key, QUANT_TYPES, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownQuant(f"unknown quant type {name!r}{hint}; valid: {', '.join(QUANT_TYPES)}")


def ftype_id(name: str) -> int:
    return QUANT_TYPES[normalize_quant(name)]


def ftype_name(ftype: int) -> str:
    """Name of a general.file_type value; unknown ids are shown as 'ftype N'."""
    return _BY_ID.get(int(ftype) & ~1024, f"ftype {ftype}")  # 1024 = LLAMA_FTYPE_GUESSED flag
