"""Tests of gpu_matrix: CPU unit tests (matrix, probe) and the GPU lane (marked gpu)."""
