"""Shared fixtures: the real Gemma 3 270M (PyPI GGUF), converted once per test session."""

import pytest
import torch

# Two cores: more threads than cores only adds contention.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def gemma3_gguf():
    """Path of the assembled GGUF (cached between sessions; assemble() verifies its sha256)."""
    pytest.importorskip("gguf")
    from mdpo.convert import pypi_gemma3_270m

    return pypi_gemma3_270m()


@pytest.fixture(scope="session")
def gemma3_dir(gemma3_gguf, tmp_path_factory):
    """An HF-layout fp32 folder converted by mdpo.convert in this session (never a stale cache)."""
    from mdpo.convert import convert_gguf

    return convert_gguf(gemma3_gguf, tmp_path_factory.mktemp("gemma3") / "gemma-3-270m")


def save_two_layer_gemma(folder):
    """A 2-layer Gemma 1 (vocab 512) saved to `folder`: for tests whose runs are mostly process work."""
    from mdpo.model import GemmaConfig, build_model
    from mdpo.weights import save_pretrained

    cfg = GemmaConfig(family="gemma", vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position_embeddings=256)
    save_pretrained(build_model(cfg, seed=0), folder)
