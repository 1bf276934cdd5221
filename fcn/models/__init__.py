"""FCN models: the network, its encoders and the bilinear-initialised upsampling layer."""

from fcn.models.backbones import BACKBONES, Encoder
from fcn.models.fcn import FCN, UPSAMPLING, VARIANTS
from fcn.models.upsample import BilinearUpsample, InterpolateUpsample, bilinear_kernel

__all__ = [
    "BACKBONES",
    "FCN",
    "UPSAMPLING",
    "VARIANTS",
    "BilinearUpsample",
    "Encoder",
    "InterpolateUpsample",
    "bilinear_kernel",
]
