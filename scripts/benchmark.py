"""Measure training, loading and evaluation speed: ``python scripts/benchmark.py [overrides]``."""

from fcn.cli.benchmark import main

if __name__ == "__main__":
    main()
