"""python -m ggml_probe: the command line."""

from .cli import main

main()
