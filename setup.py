"""FlagScale: train, infer, serve and tune large models from YAML with one command."""
from setuptools import find_packages, setup

setup(
    name="flagscale",
    version="0.1.0",
    description="Run the whole life of a large model (train, inference, serve, tune) from YAML.",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["flagscale", "flagscale.*"]),
    package_data={"flagscale": ["py.typed", "config/data/*.json"]},
    entry_points={"console_scripts": ["flagscale=flagscale.cli:main"]},
)
