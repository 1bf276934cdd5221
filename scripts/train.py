"""Train an FCN: ``python scripts/train.py [overrides]`` (same as ``fcn-train``)."""

from fcn.cli.train import main

if __name__ == "__main__":
    main()
