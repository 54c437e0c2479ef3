"""Measurement of one matrix or one model: spectra, weight matrices, the tracker, gradient ranks."""
