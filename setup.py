"""Install dalle_ds. Two top-level folders ship inside the package, so nothing collides with other
distributions and nothing is looked up in the source tree at run time:
  kernels/     -> dalle_ds.kernels     (the Triton kernels; a PyPI package is called `kernels`)
  ds_configs/  -> dalle_ds.ds_configs  (the DeepSpeed JSON configs the commands default to)
"""

from setuptools import find_packages, setup

setup(
    name="dalle_ds",
    version="0.1.0",
    description="A DeepSpeed training stack for DALL·E-style text-to-image models",
    python_requires=">=3.10",
    packages=find_packages(include=["dalle_ds", "dalle_ds.*"]) + ["dalle_ds.kernels", "dalle_ds.ds_configs"],
    package_dir={"dalle_ds.kernels": "kernels", "dalle_ds.ds_configs": "ds_configs"},
    package_data={"dalle_ds.ds_configs": ["*.json", "README.md"]},
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
        "safetensors>=0.4",
        "ftfy>=6",
        "regex>=2023",
    ],
    extras_require={"test": ["pytest>=8", "ruff>=0.6"], "tensorboard": ["tensorboard>=2.15"]},
    entry_points={"console_scripts": ["dalle-ds=dalle_ds.cli:main"]},
)
