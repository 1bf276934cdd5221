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

from fcn.process import start_process

if __name__ == "__main__":
    start_process()  # OpenMP and malloc settings before torch starts its thread pool
    from fcn.bench.fast_paths import main

    main()
