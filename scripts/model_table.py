"""The README's model zoo table: ``python scripts/model_table.py [training overrides]``."""

from fcn.process import launch

if __name__ == "__main__":
    launch("model_table")  # --help answers from the config alone, before torch loads
