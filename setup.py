from setuptools import find_packages, setup

setup(
    name="megatron-prune",
    version="0.1.0",
    description="Prune and distill Megatron-core LLMs on their tensor/pipeline-parallel shards (Minitron recipe)",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["megatron_prune", "megatron_prune.*"]),
    package_data={"megatron_prune": ["recipes/*.yaml"]},
    install_requires=[
        # torch is pinned by launch/local/install.sh (2.13.0); any 2.6+ works with megatron-core 0.16-0.19.
        "torch>=2.6",
        # 0.16.x is the newest release for Python 3.10/3.11 (0.17 and later need 3.12). What differs between
        # megatron-core (and transformers) releases is detected in megatron_prune/runtime/compat.py only.
        "megatron-core>=0.16.1,<0.20",
        "psutil",
        "numpy",
        "transformers>=4.51,<6",  # 4.x/5.x differences (RoPE, dtype spellings): runtime/compat.py
        "accelerate",  # transformers needs it to read GGUF files
        "gguf>=0.10",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",  # the pipeline report plot
        # `eval --tasks`: our model class is registered with this release's public API (TemplateLM, TaskManager)
        "lm-eval==0.4.13",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "mergekit==0.1.5", "ruff==0.17.6"],
        "gpu": ["transformer-engine[pytorch]>=2.0"],
    },
    entry_points={"console_scripts": ["megatron-prune=megatron_prune.cli:main"]},
)
