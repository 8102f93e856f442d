"""Errors a user can act on.

Every ProbeError is printed by the CLI as one line (no traceback) and exits with code 2.
"""


class ProbeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class BadModelFile(ProbeError):
    """The file is not a GGUF file llama.cpp can load (corrupt, truncated, wrong format)."""


class UnknownQuant(ProbeError):
    """A quantization type name llama.cpp does not know."""


class OutputExists(ProbeError):
    """Refusing to overwrite an existing output without --force."""


class UnsupportedArchitecture(ProbeError):
    """A model architecture this feature does not support."""


class HubError(ProbeError):
    """The Hugging Face hub could not serve the request (offline, not found, gated)."""
