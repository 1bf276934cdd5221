"""Export a checkpoint: ``python scripts/export.py checkpoint=PATH format=onnx|safetensors output=FILE``."""

from fcn.process import launch

if __name__ == "__main__":
    launch("export")  # --help answers from the config alone, before torch loads
