"""Benchmarks and evaluations (``mmsparse.eval``); results are written under ``eval/results/``."""
