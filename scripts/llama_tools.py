"""llama.cpp's own tools (llama-perplexity, llama-bench), built from the source vendored in the
llama-cpp-python sdist ggml-probe runs on, for benchmarks' baselines. Never a runtime dependency.

    python scripts/llama_tools.py            # builds (once) and prints the tools' folder

The sdist comes from PyPI (`pip download`); the build (about 8 minutes on 2 cores) is cached in
~/.cache/ggml-probe/llama-tools/<version>/ (or $GGML_PROBE_LLAMA_TOOLS).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # the llama-cpp-python pinned in pyproject.toml
TOOLS = ("llama-perplexity", "llama-bench")


def tools_dir() -> Path:
    root = Path(os.environ.get("GGML_PROBE_LLAMA_TOOLS", Path.home() / ".cache" / "ggml-probe" / "llama-tools"))
    return root / VERSION


def source_dir() -> Path:
    """The vendored llama.cpp source, unpacked from the sdist (downloaded once)."""
    root = tools_dir()
    src = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if src.exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(root)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    return src


def build(tools: tuple[str, ...] = TOOLS) -> Path:
    """Builds the tools (cached) and returns the folder holding their binaries."""
    src = source_dir()
    bin_dir = src / "build" / "bin"
    if all((bin_dir / t).exists() for t in tools):
        return bin_dir
    subprocess.run(["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"], cwd=src, check=True)
    subprocess.run(["cmake", "--build", "build", f"-j{os.cpu_count() or 2}", "--target", *tools], cwd=src, check=True)
    return bin_dir


def tool(name: str) -> Path:
    path = build() / name
    if not path.exists():
        raise FileNotFoundError(f"{name} was not built in {path.parent}")
    return path


if __name__ == "__main__":
    print(build())
