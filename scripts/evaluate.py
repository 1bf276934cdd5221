"""Evaluate a checkpoint: ``python scripts/evaluate.py checkpoint=PATH [overrides]`` (same as ``fcn-evaluate``)."""

from fcn.cli.evaluate import main

if __name__ == "__main__":
    main()
