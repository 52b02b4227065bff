"""Captions for image-text alignment: three-tier templates (EchoCare-CLIP), fitting to CLIP's 77
tokens, manifests, and rewriting with a language model. `python -m clip_us.captions --help`.

- `templates.py`: the tiers, template manifests (the phantom's too), fitting, LLM refinement;
- `llm.py`: the OpenAI-compatible HTTP client, its retries and cache;
- `manifest.py`: reading and writing manifests (the one reader), pairs and their splits;
- `__main__.py`: the command line.
"""
from .templates import (
    CaptionError,
    fit_manifest,
    fit_to_context,
    phantom_manifest,
    refine_manifest,
    template_caption,
    template_manifest,
    token_count,
)

__all__ = ["CaptionError", "fit_manifest", "fit_to_context", "phantom_manifest", "refine_manifest",
           "template_caption", "template_manifest", "token_count"]
