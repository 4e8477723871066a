"""mdpo.hub: Hub ids resolved by the real huggingface_hub from a pre-populated cache with HF_HUB_OFFLINE=1.

The cache is built by hand in the library's layout (<cache>/models--org--name/snapshots/<rev>/..., refs/main),
so nothing here touches the network.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdpo import hub
from mdpo.weights import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
REV = "0123456789abcdef0123456789abcdef01234567"


def populate(cache: Path, repo_id: str, files: dict, repo_type: str = "model") -> Path:
    """Put `files` (name -> bytes or a source Path) into a Hub cache as the snapshot of `repo_id` at refs/main."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / REV
    for name, content in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """In-process: huggingface_hub reads its cache and offline switch from these module constants."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


FAKE_MODEL = {"config.json": b"{}", "model.safetensors": b"x", "tokenizer.model": b"x",
              "pytorch_model.bin": b"never fetched"}


def test_folders_and_names_pass_through(tmp_path):
    (tmp_path / "m").mkdir()
    assert hub.resolve_model(tmp_path / "m") == str(tmp_path / "m")
    assert hub.resolve_model("tiny-gemma3") == "tiny-gemma3"  # a preset name: no slash, not an id
    assert hub.resolve_model(str(tmp_path / "missing")) == str(tmp_path / "missing")  # the loader reports it
    assert hub.is_hub_id("RLHF4MATH/Gemma-7B-it-SFT3epoch") and not hub.is_hub_id("a/b/c")
    assert not hub.is_hub_id("./x/y") and not hub.is_hub_id("/abs/path")


def test_id_resolves_offline_in_a_fresh_process(tmp_path):
    """As a user runs it: HF_HUB_CACHE and HF_HUB_OFFLINE=1 in the environment, the real library resolves."""
    pytest.importorskip("huggingface_hub")
    snap = populate(tmp_path / "hub", "org/tiny", FAKE_MODEL)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    code = ("import sys; from mdpo.hub import resolve_model, HubError\n"
            "print(resolve_model('org/tiny'))\n"
            "try: resolve_model('org/absent')\n"
            "except HubError as e: print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert Path(lines[0]) == snap
    assert lines[1] == (f"'org/absent': no such local folder, and the Hub model is not in the Hugging Face cache "
                        f"({tmp_path / 'hub'}) while the Hub is unreachable or HF_HUB_OFFLINE is set: run once online "
                        f"(`hf download org/absent`) or pass a local folder")
    assert len(lines) == 2


def test_snapshot_without_weights_is_one_line(offline_cache):
    populate(offline_cache, "org/binonly", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    with pytest.raises(hub.HubError, match=r"^https://huggingface.co/org/binonly has no config.json and safetensors "
                                           r"weights \(mdpo loads only safetensors\)"):
        hub.resolve_model("org/binonly")


def test_missing_extra_names_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so that "org/x" is not accidentally a folder
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the extra were not installed
    with pytest.raises(hub.HubError, match=r"^'org/x' is a Hugging Face Hub model id and huggingface_hub is not "
                                           r"installed: pip install 'mdpo\[hub\]'"):
        hub.resolve_model("org/x")


def test_eval_runs_from_a_hub_id(offline_cache, gemma3_dir, tmp_path):
    """`python -m mdpo.eval --model org/name`: the id resolves to the cached snapshot and the model runs."""
    from mdpo import eval as ev
    from mdpo.model import ModelConfig, build_model
    from mdpo.tokenizer import Tokenizer

    folder = tmp_path / "tiny"
    save_pretrained(build_model(ModelConfig.from_name("tiny-gemma3", vocab_size=262144), seed=0),
        folder, tokenizer=Tokenizer.from_pretrained(gemma3_dir))
    populate(offline_cache, "org/tiny-gemma", {p.name: p for p in folder.iterdir() if p.is_file()})
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "What is 2+3?", "answer": "#### 5"}) + "\n")
    out = tmp_path / "out"
    assert ev.main(["--model", "org/tiny-gemma", "--data", str(data), "--out", str(out), "--max-new-tokens", "4"]) == 0
    assert json.loads((out / "metrics.json").read_text())["model"] == "org/tiny-gemma"
    assert ev.main(["--model", "org/not-cached", "--data", str(data), "--out", str(out)]) == 2


def test_prompt_set_from_the_hub_cache(offline_cache, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from mdpo import datasets as ds

    monkeypatch.delenv("MDPO_OFFLINE", raising=False)
    table = pa.Table.from_pylist([{"idx": 3, "type": "Algebra", "problem": "1+1?", "solution": "$\\boxed{2}$"}])
    src = tmp_path / "train.parquet"
    pq.write_table(table, src)
    populate(offline_cache, "RLHF4MATH/prompt_iter1", {"data/train-00000-of-00001.parquet": src, "README.md": b"#"},
             repo_type="dataset")
    probs = ds.load_problems("prompt_iter1", tmp_path / "empty-data-dir", split="train")
    assert [(p["id"], p["question"], p["gold"]) for p in probs] == [("3", "1+1?", "2")]
    with pytest.raises(ds.DatasetError, match=r"'RLHF4MATH/prompt_iter2': no such local folder, and the Hub dataset is "
                                              r"not in the Hugging Face cache .*hf download RLHF4MATH/prompt_iter2"
                                              r" --repo-type dataset`\) or pass a local folder \(or put its files in "):
        ds.load_problems("prompt_iter2", tmp_path / "empty-data-dir", split="train")
