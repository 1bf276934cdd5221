"""The README's model zoo table: ``python scripts/model_table.py [training overrides]``."""

from fcn.process import start_process

start_process()  # before the entry point imports torch

from fcn.cli.model_table import main  # noqa: E402

if __name__ == "__main__":
    main()
