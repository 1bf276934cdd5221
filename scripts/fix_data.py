"""Repair a dataset into a copy: ``python scripts/fix_data.py data=... out=DIR`` (same as ``fcn-fix-data``)."""

from fcn.process import launch

if __name__ == "__main__":
    launch("fix_data")  # --help answers from the config alone, before torch loads
