"""Build script: the pure-Python package always; the extension nern_fast._C when it can be built."""
from setuptools import setup

setup()
