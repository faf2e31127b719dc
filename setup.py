"""Install dalle_ds. The top-level `kernels/` folder ships as `dalle_ds.kernels` so it cannot collide
with the unrelated PyPI package called `kernels`."""
from setuptools import find_packages, setup

setup(
    name="dalle_ds",
    version="0.1.0",
    description="A DeepSpeed training stack for DALL·E-style text-to-image models",
    python_requires=">=3.10",
    packages=find_packages(include=["dalle_ds", "dalle_ds.*"]) + ["dalle_ds.kernels"],
    package_dir={"dalle_ds.kernels": "kernels"},
    install_requires=[
        "torch==2.13.0",
        "deepspeed>=0.19,<0.20",
        "triton>=3.0",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "pillow>=10",
        "pyyaml>=6",
        "numpy>=1.26",
        "tqdm>=4.60",
    ],
    extras_require={"test": ["pytest>=8"], "tensorboard": ["tensorboard>=2.15"]},
    entry_points={"console_scripts": ["dalle-ds=dalle_ds.cli:main"]},
)
