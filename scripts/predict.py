"""Predict masks: ``python scripts/predict.py checkpoint=PATH input=DIR_OR_GLOB_OR_FILE output=DIR``."""

from fcn.process import launch

if __name__ == "__main__":
    launch("predict")  # --help answers from the config alone, before torch loads
