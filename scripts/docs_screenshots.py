"""Screenshots of TensorBoard for docs/tensorboard-guide.md, from a real run, in a real headless browser.

    python scripts/docs_screenshots.py WORK_DIR [--no-train] [--port 6006]

In ``WORK_DIR`` (made if missing) it runs what a user runs: a short two-job sweep on the built-in
shapes dataset (``scripts/train.py -m optim.lr=0.005,0.002`` with 5 epochs of 50 batches), then
``scripts/evaluate.py`` on the first job's best checkpoint; then ``tensorboard --logdir outputs``
and headless Chromium (selenium, ``/usr/bin/chromium`` and ``/usr/bin/chromedriver``) save the
first screen (Time Series), the sample predictions (Images) and the HPARAMS table as
``docs/img/tensorboard-*.png``, downscaled and quantised to stay under 300 KB each.
``--no-train`` takes the screenshots of the runs already in ``WORK_DIR/outputs``.
Needs ``pip install selenium`` (not a dependency of fcn).
"""

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
# The browser window, CSS pixels. The HPARAMS table needs about 1,520 (a fixed side pane, then
# columns of at least 10em: trial, "show metrics", five settings, then the scores).
WINDOW = (1600, 1150)
WIDTH = 1200  # the saved PNG's width
MAX_BYTES = 300_000
TRAIN = ["trainer.epochs=5", "trainer.limit_train_batches=50", "optim.lr=0.005,0.002"]


def _run(script: str, args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, env=env, check=True)


def train(work: Path) -> None:
    """The runs to look at: a sweep of two learning rates and an evaluation, in ``work/outputs``."""
    _run("train.py", ["-m", *TRAIN], work)
    first = sorted((work / "outputs" / "multirun").glob("*/0/checkpoints/best.pt"))[-1]
    _run("evaluate.py", [f"checkpoint={first.relative_to(work)}"], work)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def _save(browser, name: str) -> Path:
    """The window as ``docs/img/<name>.png``: downscaled to :data:`WIDTH`, then quantised to
    fewer colours until it is under :data:`MAX_BYTES`."""
    raw = IMG / f"{name}.raw.png"
    browser.save_screenshot(str(raw))
    image = Image.open(raw).convert("RGB")
    raw.unlink()
    image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    path = IMG / f"{name}.png"
    for colours in (256, 128, 64, 32):
        image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size < MAX_BYTES:
            break
    print(f"{path.relative_to(ROOT)}: {image.width}x{image.height}, {path.stat().st_size // 1000} KB")
    return path


def screenshots(url: str) -> None:
    browser = _browser()
    try:
        # 1. The first screen, as `tensorboard --logdir outputs` opens it: Time Series.
        browser.get(url)
        time.sleep(10)  # the charts load and draw
        _save(browser, "tensorboard-scalars")
        # 2. The sample predictions of each validation (input, ground truth, prediction) of one
        # run: the Images tab, its tag and run filters given in the address.
        browser.get(f"{url}#images&tagFilter=val%2Fsamples&regexInput=multirun%2F.*%2F0%2Ftensorboard%24")
        time.sleep(8)
        _save(browser, "tensorboard-images")
        # 3. The HPARAMS table: a row per run, its settings and its best val mIoU.
        browser.get(f"{url}#hparams")
        time.sleep(8)
        _save(browser, "tensorboard-hparams")
    finally:
        browser.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="folder for the runs (made if missing)")
    parser.add_argument("--no-train", action="store_true", help="use the runs already in WORK/outputs")
    parser.add_argument("--port", type=int, default=6006)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.no_train:
        train(args.work)
    board = subprocess.Popen(
        ["tensorboard", "--logdir", "outputs", "--port", str(args.port)],
        cwd=args.work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://localhost:{args.port}/"
    try:
        for _ in range(60):  # TensorBoard starts in a few seconds
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(1)
        time.sleep(5)  # and reads the event files
        screenshots(url)
    finally:
        board.terminate()
        board.wait()


if __name__ == "__main__":
    main()
