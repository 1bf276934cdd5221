"""Measure training, loading and evaluation speed: ``python scripts/benchmark.py [overrides]``."""

from fcn.process import start_process

start_process()  # before the entry point imports torch

from fcn.bench.run import main  # noqa: E402

if __name__ == "__main__":
    main()
