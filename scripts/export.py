"""Export a checkpoint: ``python scripts/export.py checkpoint=PATH format=onnx|safetensors output=FILE``."""

from fcn.cli.export import main

if __name__ == "__main__":
    main()
