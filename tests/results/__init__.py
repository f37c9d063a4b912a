"""Tests of fsynth.results, one module per module."""
