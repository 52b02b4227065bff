"""clip_us: a minimal pure-PyTorch reference implementation of CLIP adaptation for ultrasound.

    import clip_us
    model, preprocess = clip_us.load("ViT-B/16")          # OpenAI weights, cached and checksummed
    tokens = clip_us.tokenize(["an ultrasound image of a benign lesion."])
    text = model.encode_text(tokens)                      # not normalised, as OpenAI's
"""
from .adapters import load_adapter
from .model import ARCHS, CLIP, CLIPConfig, build_model
from .tokenizer import SimpleTokenizer, default_tokenizer, tokenize
from .weights import available_models, load, load_state_dict

__all__ = ["ARCHS", "CLIP", "CLIPConfig", "build_model", "SimpleTokenizer", "default_tokenizer",
           "tokenize", "available_models", "load", "load_state_dict", "load_adapter"]
__version__ = "0.1.0"
