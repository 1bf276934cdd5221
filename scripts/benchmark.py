"""Measure training, loading and evaluation speed: ``python scripts/benchmark.py [overrides]``."""

from fcn.process import launch

if __name__ == "__main__":
    launch("benchmark")  # --help answers from the config alone, before torch loads
