"""Check a dataset: ``python scripts/check_data.py data=... [data.root=...]`` (same as ``fcn-check-data``)."""

from fcn.process import start_process

start_process()  # before the entry point imports torch

from fcn.cli.check_data import main  # noqa: E402

if __name__ == "__main__":
    main()
