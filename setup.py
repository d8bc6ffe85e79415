"""Build hook for the optional C part: ddump/_records.c (records in batches, see there).

Without a C compiler or the Python headers the build goes on without it, and ddump uses the
pure-Python engine in ddump/records.py (same results, about a third of the speed, under a
quarter with 64-byte packets: BENCHMARKS.md).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ddump._records", ["ddump/_records.c"], optional=True)])
