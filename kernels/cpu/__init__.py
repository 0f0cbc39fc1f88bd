"""The CPU backend: C++ kernels (infonce.cpp, covariance.cpp; built on first use by
directclr.native) and their Python glue (primitive.py; dense.py where they cannot be built)."""
