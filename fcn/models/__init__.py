"""FCN models: the network, its encoders and the bilinear-initialised upsampling layer."""

from fcn.models.backbones import BACKBONES, Encoder
from fcn.models.fcn import FCN, VARIANTS
from fcn.models.upsample import BilinearUpsample, bilinear_kernel

__all__ = ["BACKBONES", "FCN", "VARIANTS", "BilinearUpsample", "Encoder", "bilinear_kernel"]
