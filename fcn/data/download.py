"""Opt-in dataset downloads for users who are online (``data.download=true``).

Only datasets whose licence allows a scripted download have one: Pascal VOC 2012, fetched
through torchvision (which checks the archive's MD5). Cityscapes and ADE20K need a login or a
manual download; their data configs say where to put the files.
"""

from __future__ import annotations

from pathlib import Path

from fcn.errors import UserError


def download_voc2012(root: str | Path) -> None:
    """Download and extract VOC 2012 so that ``root`` (``.../VOCdevkit/VOC2012``) exists.

    torchvision extracts into ``<base>/VOCdevkit/VOC2012``, so ``root`` must end in those two
    folders; the archive (~2 GB) is kept in ``<base>``.
    """
    root = Path(root)
    if root.parts[-2:] != ("VOCdevkit", "VOC2012"):
        raise UserError(
            f"data.download=true for VOC needs data.root to end in VOCdevkit/VOC2012 (torchvision's layout), got {root}"
        )
    from torchvision.datasets import VOCSegmentation

    base = root.parent.parent
    base.mkdir(parents=True, exist_ok=True)
    try:
        VOCSegmentation(str(base), year="2012", image_set="trainval", download=True)
    except Exception as exc:  # noqa: BLE001 - network, SSL, checksum and disk errors all end the same way
        raise UserError(
            f"could not download Pascal VOC 2012 into {base.resolve()} ({exc.__class__.__name__}: {exc}). Offline, "
            f"fetch VOCtrainval_11-May-2012.tar by hand and extract it in {base.resolve()} "
            "(it creates VOCdevkit/VOC2012), then run without data.download"
        ) from exc


DOWNLOADS = {"voc": download_voc2012}


def download(name: str, root: str | Path) -> None:
    """Download dataset ``name`` into ``root`` when it is not there yet."""
    if Path(root).is_dir():
        return
    if name not in DOWNLOADS:
        raise UserError(
            f"data.download=true: no download for dataset {name!r} (available: {sorted(DOWNLOADS)}); "
            "download it by hand and set data.root"
        )
    DOWNLOADS[name](root)
