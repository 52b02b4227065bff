"""EchoCare-CLIP ("Ultrasound Vision-Language Alignment via Contrastive Learning"): the dual
encoder of a Swin image encoder and a CLIP or BioClinicalBERT text tower.

- `swin.py`: EchoCare's Swin transformer (MONAI's SwinTransformer v2 layout);
- `bert.py`: BERT and its WordPiece tokenizer from a Hugging Face folder;
- `data.py`: the authors' image transform and caption data set;
- `model.py`: the dual model, its MLP heads and learnable temperature, build / save / load.
"""
from .model import (
    HEADS,
    RECIPE,
    TRAIN_MODES,
    EchoCareCLIP,
    build,
    expected_counts,
    for_contrastive,
    load,
    recipe_hold_out,
    save,
    set_trainable,
)

__all__ = ["HEADS", "RECIPE", "TRAIN_MODES", "EchoCareCLIP", "build", "expected_counts",
           "for_contrastive", "load", "recipe_hold_out", "save", "set_trainable"]
