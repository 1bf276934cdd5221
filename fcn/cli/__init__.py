"""Process plumbing: the Hydra entry points, ``torchrun`` and SLURM process groups, run directories,
signals and exit codes. The run they start (:mod:`fcn.train`) reads the composed config; everything
below it takes plain arguments. Importing this package changes nothing in the process: the settings
made before torch loads are :func:`fcn.process.start_process`'s."""

from pathlib import Path

# The Hydra config folder every entry point reads (``configs/`` at the repository root).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
