"""Everything about the package is in pyproject.toml; this file only lets tools that still call
`python setup.py` find it. Install with `pip install .` (or `pip install -e .`)."""
from setuptools import setup

setup()
