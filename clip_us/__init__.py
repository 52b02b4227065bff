"""clip_us: a minimal pure-PyTorch reference implementation of CLIP adaptation for ultrasound."""
from .model import ARCHS, CLIP, CLIPConfig, build_model

__version__ = "0.1.0"
