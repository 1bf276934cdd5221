"""Train an FCN: ``python scripts/train.py [overrides]`` (same as ``fcn-train``); on several devices
``torchrun --nproc_per_node=N scripts/train.py [overrides]``."""

from fcn.process import launch

if __name__ == "__main__":
    launch("train")  # --help answers from the config alone, before torch loads
