"""Entry points: the only code that reads the Hydra config. Everything they call takes plain arguments."""

from pathlib import Path

# The Hydra config folder every entry point reads (``configs/`` at the repository root).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
