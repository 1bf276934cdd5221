"""Predict masks: ``python scripts/predict.py checkpoint=PATH input=DIR_OR_GLOB_OR_FILE output=DIR``."""

from fcn.process import start_process

start_process()  # before the entry point imports torch

from fcn.cli.predict import main  # noqa: E402

if __name__ == "__main__":
    main()
