"""Search hyperparameters with Optuna, pruning trials that fall behind: ``python scripts/search.py
[search.KEY=VALUE ...] [training overrides]`` (same as ``fcn-search``); ``--help`` for examples."""

from fcn.process import launch

if __name__ == "__main__":
    launch("search")  # --help answers from the config alone, before torch loads
