from setuptools import find_packages, setup

setup(
    name="llama_jax",
    version="0.1.0",
    description="LLaMA models in JAX/Flax: exact against PyTorch, sharded, trainable, convertible.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # as jax 0.10 requires
    packages=find_packages(include=["llama_jax", "llama_jax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8,<0.13",
        "numpy>=2.0",  # as jax 0.10 requires
        "ml_dtypes",
        "ml_collections>=1.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2.2",
        "tiktoken>=0.12",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.5",
        "grain>=0.2.18",
        "tensorboardX>=2.6.2.2",
        "matplotlib>=3.8.4",
        "tqdm",
    ],
    extras_require={
        # PyTorch is pinned to 2.13.0 (the Makefile installs it first; TORCH_PIP_OPTIONS can point pip at its CPU
        # build); transformers is only the reference oracle in tests. pytest-xdist runs the test files on
        # several processes (`make test TEST_WORKERS=N`).
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch==2.13.0", "transformers>=5.24,<6", "optuna>=4",
                 "submitit>=1.5", "lm-eval>=0.4.12", "accelerate", "protobuf"],
        # Model-based sweeps (llama-jax sweep --search optuna); grid and random searches need nothing.
        "sweep": ["optuna>=4"],
        # Launching on SLURM (llama-jax launch slurm); TPU launching needs only the gcloud CLI.
        "launch": ["submitit>=1.5"],
        # lm-evaluation-harness benchmarks (llama-jax lm-eval). The tests also run the harness's Hugging
        # Face backend as the reference, which needs accelerate (and torch) and protobuf.
        "eval": ["lm-eval>=0.4.12"],
    },
    entry_points={"console_scripts": ["llama-jax=llama_jax.cli:main"]},
)
