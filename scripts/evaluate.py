"""Evaluate a checkpoint: ``python scripts/evaluate.py checkpoint=PATH [overrides]`` (same as ``fcn-evaluate``)."""

from fcn.process import launch

if __name__ == "__main__":
    launch("evaluate")  # --help answers from the config alone, before torch loads
