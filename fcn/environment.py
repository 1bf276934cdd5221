"""The installed torch and torchvision, checked before a run: builds that do not match (as mixing
package indexes gives) end in one line naming both versions and the install command that fixes it,
not in the 25-line traceback of ``operator torchvision::nms does not exist``."""

from __future__ import annotations

import re
import shlex
from importlib import metadata

from fcn.errors import UserError


def check_torchvision() -> None:
    """Import torchvision; raises :class:`UserError` naming both versions and the fix when it does
    not load with this torch (a missing operator or symbol), or is not installed."""
    try:
        import torchvision  # noqa: F401 - the import is the check
    except ModuleNotFoundError as exc:
        if exc.name != "torchvision":
            raise
        raise UserError(f"torchvision is not installed: {fix_command()}") from exc
    except (RuntimeError, ImportError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"torch {_version('torch')} and torchvision {_version('torchvision')} are builds that do not match "
            f"({first}); fix: {fix_command()}"
        ) from exc


def fix_command(torch_version: str | None = None) -> str:
    """The pip command installing the torchvision that matches ``torch_version`` (the installed torch's):
    torchvision 0.(N+15) pairs with torch 2.N, from the same CUDA index (``+cu130`` -> ``whl/cu130``).

    ``--force-reinstall``: a torchvision of that version from another index (``+cpu`` next to a
    ``+cu130`` torch) satisfies the pin, and pip would otherwise do nothing. ``--no-deps``: torchvision
    pins an exact torch, which pip would otherwise reinstall or swap for another build; the rest of
    its requirements (numpy, pillow) are fcn's own and already installed."""
    version = torch_version or _version("torch")
    match = re.match(r"2\.(\d+)\.\d+(?:\+([\w.]+))?", version)
    if match is None:
        return "pip install --force-reinstall torch torchvision (from one package index)"
    words = ["pip", "install", "--force-reinstall", "--no-deps", f"torchvision==0.{int(match.group(1)) + 15}.*"]
    if match.group(2):  # a build of PyTorch's own index (cu130, cpu, rocm6.2): torchvision from the same one
        words += ["--index-url", f"https://download.pytorch.org/whl/{match.group(2)}"]
    return " ".join(shlex.quote(w) for w in words)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(not installed)"
