"""hvla: hierarchical vision-language alignment in JAX."""
import setuptools

setuptools.setup(
    name="hvla",
    version="0.1.0",
    description="Pretraining vision-language models with hierarchical alignment in JAX/Flax.",
    packages=setuptools.find_packages(include=["hvla", "hvla.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-datasets>=4.9,<4.10",
        "grain>=0.2,<0.3",
        "array-record>=0.8,<0.9",
        "sentencepiece>=0.2,<0.3",
        "ml-collections>=1.1,<1.2",
        "clu>=0.0.12,<0.1",
        "tensorflow-cpu>=2.21,<2.22",
        "tensorboard>=2.19",
        "numpy>=1.26",
        "pillow>=10",
        # English word lists with parts of speech, shipped in the package: the noun
        # rules of hvla.tools.extract_concepts (no tagger model to download).
        "lemminflect>=0.2.3,<0.3",
    ],
    extras_require={
        # transformers' Flax CLIP, the speed reference of benchmarks.reference (run from the
        # repository root: benchmarks/ is not installed).
        "reference": ["transformers>=4.50,<5"],
        "test": ["pytest>=8", "pytest-xdist>=3", "transformers>=4.50,<5"],
    },
)
