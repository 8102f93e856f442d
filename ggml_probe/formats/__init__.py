"""File formats read without llama.cpp: GGUF headers (bounds-checked, one-line errors) and imatrix files."""
