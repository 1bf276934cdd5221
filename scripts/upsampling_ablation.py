"""The upsampling ablation: ``python scripts/upsampling_ablation.py [training overrides]``."""

from fcn.process import start_process

start_process()  # before the entry point imports torch

from fcn.cli.upsampling_ablation import main  # noqa: E402

if __name__ == "__main__":
    main()
