"""Search hyperparameters with Optuna, pruning trials that fall behind: ``python scripts/search.py
[search.KEY=VALUE ...] [training overrides]`` (same as ``fcn-search``); ``--help`` for examples."""

from fcn.process import start_process

start_process()  # before the entry point imports torch

from fcn.cli.search import main  # noqa: E402

if __name__ == "__main__":
    main()
