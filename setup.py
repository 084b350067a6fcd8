"""Packaging for lm: pretraining Transformer language models in JAX."""

import setuptools

setuptools.setup(
    name="lm",
    version="0.1.0",
    description="Pretrain GPT-2 and Llama style language models in JAX, from a laptop to a pod.",
    packages=setuptools.find_packages(include=["lm", "lm.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",  # a given Hugging Face tokenizer.json (Llama 3's, GPT-2's)
        "tensorflow-datasets>=4.9.6",
        "array-record>=0.5",
        "grain>=0.2.10",
        "safetensors>=0.4",  # Hugging Face export and import, through its numpy API
        # tensorflow-datasets imports it when a builder lives in an installed package, but only
        # declares it for Python < 3.9.
        "importlib_resources",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "psutil>=5", "nbclient>=0.9", "nbformat>=5.9", "ipykernel>=6", "matplotlib>=3.7"],
        "notebooks": ["matplotlib>=3.7", "ipykernel>=6"],
        # Only the interop tests need these (lm's export and import do not). torch is pinned to a
        # release with a CPU build on PyPI's mirrors; install the CPU wheel first to skip CUDA.
        "interop": ["transformers>=4.45", "torch==2.13.0"],
        "gpu": ["jax[cuda12]>=0.10"],
        "tpu": ["jax[tpu]>=0.10"],
    },
)
