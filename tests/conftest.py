"""Shared fixtures: the demo model, a ladder built from it once per session, the shared data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("GGML_PROBE_SHARED", REPO.parent / "shared")) / "data"


@pytest.fixture(scope="session")
def boolq_path() -> Path:
    p = shared_data_dir() / "boolq_validation.jsonl"
    if not p.exists():
        pytest.skip(f"shared BoolQ data not found at {p}")
    return p


@pytest.fixture(scope="session")
def jigsaw_path() -> Path:
    p = shared_data_dir() / "jigsaw_toxic_test_balanced.jsonl"
    if not p.exists():
        pytest.skip(f"shared Jigsaw data not found at {p}")
    return p


@pytest.fixture(scope="session")
def demo_path() -> Path:
    from ggml_probe.errors import ProbeError
    from ggml_probe.models.store import demo_model_path

    try:
        return demo_model_path()
    except ProbeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def demo_ladder(demo_path, tmp_path_factory) -> dict[str, Path]:
    """F16, Q8_0, Q4_0 and Q4_K_M files requantized from the demo model, built once per session."""
    from ggml_probe.models.quantize import quantize_ladder

    out = tmp_path_factory.mktemp("ladder")
    results = quantize_ladder(demo_path, ["F16", "Q8_0", "Q4_0", "Q4_K_M"], out_dir=out, allow_requantize=True)
    return {r.quant: r.path for r in results}


@pytest.fixture(scope="session")
def real_vocab_model(tmp_path_factory):
    """real_vocab_model(name): a tiny random-weight GGUF carrying ../shared/data/vocab's real tokenizer `name`,
    written once per session (skips when that vocabulary file is absent)."""
    from real_vocab_tiny import vocab_path, write_tiny_model

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        path = vocab_path(name)
        if not path.exists():
            pytest.skip(f"{path} not found")
        if name not in made:
            made[name] = write_tiny_model(tmp_path_factory.mktemp(name) / f"tiny-{name}.gguf", path)
        return made[name]

    return get
