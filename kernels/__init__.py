"""Triton GPU kernels of directclr, one file per op (C++ CPU kernels live in kernels/cpu/)."""
