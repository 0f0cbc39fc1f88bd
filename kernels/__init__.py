"""Triton GPU kernels of directclr, one file per op (the C++ CPU kernels and the CPU
backend's glue live in kernels/cpu/)."""
