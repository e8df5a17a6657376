"""Compiled kernels (Cython over BLAS/LAPACK)."""
