"""Check a dataset: ``python scripts/check_data.py data=... [data.root=...]`` (same as ``fcn-check-data``)."""

from fcn.process import launch

if __name__ == "__main__":
    launch("check_data")  # --help answers from the config alone, before torch loads
