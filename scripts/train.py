"""Train an FCN: ``python scripts/train.py [overrides]`` (same as ``fcn-train``); on several devices
``torchrun --nproc_per_node=N scripts/train.py [overrides]``."""

from fcn.cli.train import main

if __name__ == "__main__":
    main()
