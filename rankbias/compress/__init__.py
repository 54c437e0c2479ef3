"""Compression: low-rank factorization of trained layers."""
