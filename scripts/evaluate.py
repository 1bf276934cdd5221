"""Evaluate a checkpoint: ``python scripts/evaluate.py checkpoint=PATH [overrides]`` (same as ``fcn-evaluate``)."""

from fcn.process import start_process

start_process()  # before the entry point imports torch

from fcn.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
