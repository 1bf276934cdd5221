"""Export a checkpoint: ``python scripts/export.py checkpoint=PATH format=onnx|safetensors output=FILE``."""

from fcn.process import start_process

start_process()  # before the entry point imports torch

from fcn.cli.export import main  # noqa: E402

if __name__ == "__main__":
    main()
