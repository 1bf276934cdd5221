"""The upsampling ablation: ``python scripts/upsampling_ablation.py [training overrides]``."""

from fcn.process import launch

if __name__ == "__main__":
    launch("upsampling_ablation")  # --help answers from the config alone, before torch loads
