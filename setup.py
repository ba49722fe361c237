"""entropy_jax: information-geometric training analysis for JAX language models."""

from setuptools import find_packages, setup

setup(
    name="entropy_jax",
    version="0.1.0",
    description="Train Flax LMs, checkpoint with Orbax, and probe representation geometry across training.",
    # experiments: the entry scripts' package, so that a config file loaded by path (absl's --config=<file>)
    # can import the preset it builds on (experiments.configs.pretrain) from any folder.
    packages=find_packages(include=["entropy_jax", "entropy_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.11",  # jax, flax, orbax-checkpoint and grain require 3.11
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.20",
        "tensorflow-datasets>=4.9.9",
        "array_record>=0.8.1",
        "importlib_resources>=6",  # TFDS's published builders (lm1b, tiny_shakespeare) import it to download
        "grain>=0.2.12",
        "ml_collections>=1.1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.13",
        "pandas>=2.2",
        "pyarrow>=16",
        "matplotlib>=3.9",
        "tqdm>=4.66",
        "safetensors>=0.4",  # Hugging Face weights through the numpy backend (entropy_jax.models.hf)
    ],
    extras_require={
        "test": ["pytest>=8", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "ruff>=0.6", "psutil>=5.9",
                 "tokenizers>=0.15", "pytest-xdist>=3.5"],
        # Imported checkpoints: the models' own tokenizers, and downloads from the Hub.
        "hf": ["tokenizers>=0.15", "huggingface_hub>=0.20"],
        "notebooks": ["jupyterlab>=4", "ipykernel>=6.29"],
    },
)
