"""Zero-shot prompts: the ultrasound-CLIP paper's detailed prompts, EchoCare-CLIP's template,
and ensemble files.

Class order is fixed across clip_us: benign = 0, malignant = 1 (positive), normal = 2 (optional).

- The ultrasound-CLIP paper (§4.3) prints one combined prompt per dataset (LN and BUSI), at most
  77 tokens, ending in "The abnormality in this ... scan is {benign/malignant}". We fill the slot per class.
- The official code encodes a set of prompts per class (10 in the code); the logit is 100·cos
  averaged over a class's prompts, softmax, P(malignant) > 0.5. `ensemble` below is our own set of
  ten paraphrases per class, in that spirit.
- EchoCare-CLIP: "An ultrasound image of {organ} with {label} findings."
- A JSON file mapping each class name to a list of prompts.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..labels import CLASSES

# The ultrasound-CLIP paper (§4.3), verbatim (the missing space after "margins." in the LN prompt is
# the paper's).
PAPER_PROMPTS = {
    "ln": ("Benign: Oval shape, preserved echogenic hilum, thin homogeneous cortex. Malignant: "
           "Round, absent hilum, thickened/heterogeneous cortex, microcalcifications, irregular "
           "margins.The abnormality in this lymph node scan is {label}"),
    "busi": ("Benign: Oval shape, smooth margins, parallel orientation, homogeneous hypoechoic "
             "echotexture, posterior enhancement. Malignant: Irregular shape, spiculated margins, "
             "non-parallel orientation, heterogeneous hypoechoic echotexture, microcalcifications, "
             "posterior acoustic shadowing. The abnormality in this breast scan is {label}"),
}

ECHOCARE_TEMPLATE = "An ultrasound image of {organ} with {label} findings."

ENSEMBLE_TEMPLATES = (
    "an ultrasound image of a {label} lesion.",
    "a B-mode ultrasound scan showing a {label} {organ} lesion.",
    "ultrasound of the {organ} with a {label} mass.",
    "a {label} finding on {organ} ultrasound.",
    "sonography of a {label} {organ} nodule.",
    "this {organ} ultrasound shows a {label} abnormality.",
    "a grayscale ultrasound image of a {label} tumour in the {organ}.",
    "the lesion in this {organ} scan is {label}.",
    "an ultrasound of a {label} {organ} lesion with typical features.",
    "a medical ultrasound image, {label}.",
)

DATASET_ORGAN = {"busi": "breast", "ln1": "lymph node", "ln2": "lymph node", "ddti": "thyroid",
                 "tn3k": "thyroid", "prostate": "prostate", "phantom": "breast"}


def paper_prompts(dataset: str, classes=CLASSES[:2]) -> dict[str, list[str]]:
    """The ultrasound-CLIP paper's combined prompt for an LN or BUSI dataset, one per class."""
    key = "ln" if dataset.startswith("ln") else dataset
    if key not in PAPER_PROMPTS:
        raise KeyError(f"the paper prints prompts for LN and BUSI only, not {dataset!r}; "
                       f"use --prompts echocare, ensemble or a JSON file")
    return {c: [PAPER_PROMPTS[key].format(label=c)] for c in classes}


def template_prompts(templates, organ: str, classes=CLASSES[:2]) -> dict[str, list[str]]:
    return {c: [t.format(label=c, organ=organ) for t in templates] for c in classes}


def load_prompt_file(path, classes=CLASSES[:2]) -> dict[str, list[str]]:
    """A JSON file {class name: [prompt, ...]} with every class present."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read prompt file {path}: {e}") from e
    missing = [c for c in classes if not isinstance(data, dict) or not data.get(c)]
    if missing:
        raise ValueError(f"prompt file {path} must map each of {list(classes)} to a non-empty "
                         f"list of prompts; missing or empty: {missing}")
    return {c: [data[c]] if isinstance(data[c], str) else list(data[c]) for c in classes}


def get_prompts(source: str, dataset: str, organ: str | None = None,
                classes=CLASSES[:2]) -> dict[str, list[str]]:
    """source: "paper", "echocare", "ensemble" or a path to a JSON file."""
    organ = organ or DATASET_ORGAN.get(dataset) or ("lymph node" if dataset.startswith("ln") else None)
    if organ is None and source != "paper":
        raise ValueError(f"no organ known for data set {dataset!r}: pass --organ (e.g. breast, "
                         f"thyroid, lymph node)")
    if source == "paper":
        return paper_prompts(dataset, classes)
    if source == "echocare":
        return template_prompts([ECHOCARE_TEMPLATE], organ, classes)
    if source == "ensemble":
        return template_prompts(ENSEMBLE_TEMPLATES, organ, classes)
    return load_prompt_file(source, classes)
