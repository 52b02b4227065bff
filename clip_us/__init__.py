"""clip_us: a minimal pure-PyTorch reference implementation of CLIP adaptation for ultrasound.

    import clip_us
    model, preprocess = clip_us.load("ViT-B/16")          # OpenAI weights, cached and checksummed
    tokens = clip_us.tokenize(["an ultrasound image of a benign lesion."])
    text = model.encode_text(tokens)                      # not normalised, as OpenAI's

    model, tokenizer = clip_us.load_biomedclip("BiomedCLIP folder")   # open_clip's, rebuilt
"""
from .adapters import load_adapter
from .model import ARCHS, CLIP, CLIPConfig, build_model
from .tokenizer import SimpleTokenizer, default_tokenizer, tokenize
from .weights import available_models, load, load_state_dict

__all__ = ["ARCHS", "CLIP", "CLIPConfig", "build_model", "SimpleTokenizer", "default_tokenizer",
           "tokenize", "available_models", "load", "load_state_dict", "load_adapter",
           "load_biomedclip"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`clip_us.load_biomedclip`, imported on first use (PEP 562): its BERT comes with
    clip_us.echocare, whose import (torchvision) would add seconds to every `import clip_us`."""
    if name == "load_biomedclip":
        from .baselines.biomedclip import load_biomedclip
        return load_biomedclip
    raise AttributeError(f"module 'clip_us' has no attribute {name!r}")
