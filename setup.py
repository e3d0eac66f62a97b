"""Install ssl-distill: the library, its evaluation and launch modules, and the `ssl-distill` command.

`eval/` and `launch/` are top-level folders by the user's choice; they install as
`ssl_distill.eval` and `ssl_distill.launch` so nothing claims the global names `eval` or `launch`.
"""
from setuptools import setup

setup(
    name="ssl-distill",
    version="0.1.0",
    description="Student / EMA-teacher self-distillation (DINO, iBOT, ODIS) for Vision Transformers",
    python_requires=">=3.10",
    packages=[
        "ssl_distill",
        "ssl_distill.models",
        "ssl_distill.objectives",
        "ssl_distill.data",
        "ssl_distill.checkpoints",
        "ssl_distill.checkpoints.layouts",
        "ssl_distill.engine",
        "ssl_distill.report",
        "ssl_distill.eval",
        "ssl_distill.launch",
    ],
    package_dir={"ssl_distill.eval": "eval", "ssl_distill.launch": "launch"},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm>=1.0.20",  # its DINOv3 port: Eva with rope_type="dinov3", RotaryEmbeddingDinoV3, vit_*_dinov3_qkvb
        "faiss-cpu>=1.8",
        "submitit>=1.5",
        "scikit-learn>=1.4",
        "pillow>=10",
        "numpy>=1.24",
        "scipy>=1.10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "scikit-image>=0.22"],
        "tensorboard": ["tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["ssl-distill=ssl_distill.cli:main"]},
)
