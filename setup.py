"""Build script. Plain `pip install .` builds nothing native: csrc/ compiles just in time on first use.

Set PGDPO_BUILD_CPU_OP=1 to prebuild the fused C++ CPU op (see pgdpo/cpu_op.py).
"""

from setuptools import setup

setup()
