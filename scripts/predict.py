"""Predict masks: ``python scripts/predict.py checkpoint=PATH input=DIR_OR_GLOB_OR_FILE output=DIR``."""

from fcn.cli.predict import main

if __name__ == "__main__":
    main()
