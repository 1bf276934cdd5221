"""The README's model zoo table: ``python scripts/model_table.py [training overrides]``."""

from fcn.cli.model_table import main

if __name__ == "__main__":
    main()
