"""Measure the per-backbone fast paths on this machine, in one process, interleaved (A B A B):
``python scripts/measure_fast_paths.py [--backbones tiny vgg16] [--crop 128] [--batch 8] [--classes 21]
[--variant 8s] [--rounds 2] [--steps 3]``.

For each backbone it times training steps (forward, cross-entropy, backward, AdamW step) with
channels-last on and off, and in the backbone's layout with the decoder's upsampling computed as
a sub-pixel convolution (the default) and as ``ConvTranspose2d``, the AdamW update alone with
torch's per-tensor, foreach and fused implementations, and inference (forward passes in eval
mode, in the backbone's layout from ``CHANNELS_LAST_CPU``) with batch norm as trained and folded
into the convolutions. The variants
alternate round by round, so that a change in the machine's load hits all of them alike. Prints
one JSON line per backbone with the median seconds and the ratios; the table in ``fcn/device.py``
(``CHANNELS_LAST_CPU``) records what it printed here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fcn.device import CHANNELS_LAST_CPU
from fcn.models import FCN, VARIANTS
from fcn.models.backbones import BACKBONES
from fcn.models.fold import fold_batch_norm
from fcn.models.upsample import BilinearUpsample


def _timed(fn, steps: int) -> float:
    fn()  # warm-up: first-call allocations, oneDNN primitive creation
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def measure(
    backbone: str, crop: int, batch: int, rounds: int, steps: int, num_classes: int = 21, variant: str = "8s"
) -> dict:
    """Median seconds per training step (channels-last on/off; sub-pixel or transposed upsampling)
    and per AdamW update (per-tensor, foreach, fused) for ``backbone``; ratios > 1 mean the second
    variant is faster."""
    torch.manual_seed(0)
    images = torch.randn(batch, 3, crop, crop)
    masks = torch.randint(0, num_classes, (batch, crop, crop))
    best_layout = "channels_last" if CHANNELS_LAST_CPU.get(backbone, True) else "contiguous"
    models, optims, layouts = {}, {}, {}
    for name, layout in (("contiguous", "contiguous"), ("channels_last", "channels_last"), ("transposed", best_layout)):
        model = FCN(num_classes=num_classes, backbone=backbone, variant=variant, pretrained=False)
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        if name == "transposed":
            for module in model.modules():
                if isinstance(module, BilinearUpsample):
                    module.subpixel_training = False
        models[name], layouts[name] = model, layout
        optims[name] = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train_step(name: str):
        x = images.contiguous(memory_format=torch.channels_last) if layouts[name] == "channels_last" else images
        optims[name].zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(models[name](x), masks).backward()
        optims[name].step()

    model = models["contiguous"]
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    updates = {
        "per_tensor": torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False),
        "foreach": torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True),
        "fused": torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True),
    }
    eval_input = images.contiguous(memory_format=torch.channels_last) if best_layout == "channels_last" else images
    plain = models[best_layout].eval()
    inference = {"batch_norm": plain, "folded": fold_batch_norm(plain)}

    def infer(net):
        with torch.inference_mode():
            net(eval_input)

    step_s = {k: [] for k in models}
    update_s = {k: [] for k in updates}
    eval_s = {k: [] for k in inference}
    for _ in range(rounds):
        for name in models:
            models[name].train()
            step_s[name].append(_timed(lambda name=name: train_step(name), steps))
        for name, opt in updates.items():
            update_s[name].append(_timed(opt.step, steps * 3))
        for name, net in inference.items():
            net.eval()  # the trained model is also one of the training variants, put back in train mode above
            eval_s[name].append(_timed(lambda net=net: infer(net), steps * 2))
    step = {k: statistics.median(v) for k, v in step_s.items()}
    update = {k: statistics.median(v) for k, v in update_s.items()}
    evaluation = {k: statistics.median(v) for k, v in eval_s.items()}
    return {
        "backbone": backbone,
        "variant": variant,
        "classes": num_classes,
        "crop": crop,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "step_s": {k: round(v, 4) for k, v in step.items()},
        "channels_last_speedup": round(step["contiguous"] / step["channels_last"], 3),
        "subpixel_speedup": round(step["transposed"] / step[best_layout], 3),
        "adamw_update_s": {k: round(v, 5) for k, v in update.items()},
        "fused_speedup_vs_per_tensor": round(update["per_tensor"] / update["fused"], 3),
        "fused_saving_of_step": round((update["per_tensor"] - update["fused"]) / step["contiguous"], 3),
        "eval_layout": best_layout,
        "eval_img_s": {k: round(batch / v, 2) for k, v in evaluation.items()},
        "fold_speedup": round(evaluation["batch_norm"] / evaluation["folded"], 3),
    }


def _positive(text: str) -> int:
    """argparse type: an integer of at least 1 (a crop, batch, class count, round or step count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["tiny", "vgg16"], choices=sorted(BACKBONES))
    parser.add_argument("--crop", type=_positive, default=128)
    parser.add_argument("--batch", type=_positive, default=8)
    parser.add_argument("--classes", type=_positive, default=21)
    parser.add_argument("--variant", default="8s", choices=VARIANTS)
    parser.add_argument("--rounds", type=_positive, default=2)
    parser.add_argument("--steps", type=_positive, default=3)
    args = parser.parse_args()
    for backbone in args.backbones:
        try:
            result = measure(backbone, args.crop, args.batch, args.rounds, args.steps, args.classes, args.variant)
        except ValueError as exc:  # e.g. batch norm given one value per channel: a batch of 1 at a small crop
            parser.error(f"{backbone} at --crop {args.crop} --batch {args.batch}: {exc} (a larger crop or batch)")
        print(json.dumps(result), flush=True)
