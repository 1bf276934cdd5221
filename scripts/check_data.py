"""Check a dataset: ``python scripts/check_data.py data=... [data.root=...]`` (same as ``fcn-check-data``)."""

from fcn.cli.check_data import main

if __name__ == "__main__":
    main()
