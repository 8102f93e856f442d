"""The engine: the only code in ggml-probe that calls into llama.cpp (llama-cpp-python's ctypes API)."""
