"""Entry points: the only code that reads the Hydra config. Everything they call takes plain arguments."""

from pathlib import Path

from fcn.malloc import keep_freed_memory
from fcn.threads import set_openmp_defaults

# Before any entry point imports torch: OpenMP threads that spin only briefly at a barrier, then
# sleep (fcn/threads.py says why; a variable the user exported wins).
set_openmp_defaults()
# Large tensors reuse freed heap memory instead of fresh, zero-filled pages every step
# (fcn/malloc.py says why; the user's own malloc settings win).
keep_freed_memory()

# The Hydra config folder every entry point reads (``configs/`` at the repository root).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
