"""fastbisenet: BiSeNet semantic segmentation whose hot paths are fused OpenAI Triton kernels."""

from fastbisenet.model import BiSeNet
from fastbisenet.weights import load_backbone_weights, load_pretrained

__version__ = "0.1.0"
__all__ = ["BiSeNet", "__version__", "load_backbone_weights", "load_pretrained"]
