"""Train an FCN: ``python scripts/train.py [overrides]`` (same as ``fcn-train``); on several devices
``torchrun --nproc_per_node=N scripts/train.py [overrides]``."""

from fcn.process import start_process

start_process()  # before the entry point imports torch

from fcn.cli.train import main  # noqa: E402

if __name__ == "__main__":
    main()
