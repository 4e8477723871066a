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
    from mdpo.model import ModelConfig, build_model
    from mdpo.weights import save_pretrained

    cfg = ModelConfig(family="gemma", vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position_embeddings=256)
    save_pretrained(build_model(cfg, seed=0), folder)


def tiny_model_and_pairs(folder, make_traj):
    """save_two_layer_gemma(folder / "init") and 12 random pairs (folder / "pairs.jsonl") from `make_traj(g, prompt
    id, sample id, prompt)`: a training run of a second or two."""
    import json

    save_two_layer_gemma(folder / "init")
    g = torch.Generator().manual_seed(0)
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(12):
            prompt = [2] + torch.randint(5, 512, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
            f.write(json.dumps({"chosen": json.loads(make_traj(g, f"q{i}", 0, prompt).to_json()),
                                "rejected": json.loads(make_traj(g, f"q{i}", 1, prompt).to_json())}) + "\n")
    return folder
