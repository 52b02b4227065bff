"""Zero-shot prompts: the ultrasound-CLIP paper's official ensembles and its detailed prompts,
EchoCare-CLIP's template, and ensemble files.

Class order is fixed across clip_us: benign = 0, malignant = 1 (positive), normal = 2 (optional).

- The ultrasound-CLIP paper (§4.3) prints one combined prompt per dataset (LN and BUSI), at most
  77 tokens, ending in "The abnormality in this ... scan is {benign/malignant}". We fill the slot per class.
- The official zero-shot script (NextGen-UIA `src/models/clip/zero_shot.py`) encodes ten prompts
  per class, `LN_PROMPTS_ENSEMBLE` or `BREAST_PROMPTS_ENSEMBLE` of `src/models/zero_shot_prompt.py`
  (OFFICIAL_PROMPTS below, verbatim); the logit is 100·cos averaged over a class's prompts,
  softmax, P(malignant) > 0.5. zeroshot.py uses them by default for LN and BUSI. `ensemble` below
  is our own set of ten templates per class, in that spirit, for the other organs.
- EchoCare-CLIP: "An ultrasound image of {organ} with {label} findings." (its authors'
  build_label_prompt; not one of clip_us.captions' templates). evaluate.py names each image's
  organ; their in-distribution notebook names "breast" for every organ (`echocare_prompts`).
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

# NextGen-UIA src/models/zero_shot_prompt.py (commit 2e5fd63), verbatim: LN_PROMPTS_ENSEMBLE ("ln")
# and BREAST_PROMPTS_ENSEMBLE ("busi"). The official script picks the first for a data set whose
# name contains "ln", the second for "busi", and refuses the others.
OFFICIAL_PROMPTS = {
    "ln": {
        "benign": [
            "A benign lymph node with an oval shape and a preserved fatty hilum",
            "A benign lymph node with a long-to-short axis ratio greater than 2",
            "A benign lymph node showing a clear, echogenic central hilum",
            "A benign lymph node with a smooth, well-defined border",
            "A benign lymph node characterized by its regular, oval morphology and homogeneous "
            "echotexture",
            "A benign lymph node with a thin, uniform cortex surrounding a prominent hilum",
            "A benign lymph node appearing as a well-defined, hypoechoic oval structure with a "
            "bright central hilum",
            "A benign lymph node featuring a distinct fatty hilum and regular shape",
            "A benign lymph node with normal morphology, including a visible hilum and uniform "
            "cortex",
            "A benign lymph node that is distinctly elongated and maintains its central echogenic "
            "hilum",
        ],
        "malignant": [
            "A malignant lymph node with a round shape and an absent or effaced hilum",
            "A malignant lymph node with a long-to-short axis ratio less than 2",
            "A malignant lymph node with loss of the central fatty hilum",
            "A malignant lymph node with an irregular, spiculated, or blurred border",
            "A malignant lymph node containing internal microcalcifications",
            "A malignant lymph node showing internal cystic necrosis or liquefaction",
            "A malignant lymph node that is markedly hypoechoic and has a heterogeneous texture",
            "A malignant lymph node with eccentric cortical thickening",
            "A malignant lymph node appearing as a round, solid mass with indistinct margins",
            "A malignant lymph node characterized by a round shape and heterogeneous internal "
            "echoes",
        ],
    },
    "busi": {
        "benign": [
            "A benign nodule with an oval shape and circumscribed margins",
            "A benign nodule with a parallel orientation, appearing wider-than-tall",
            "A benign nodule, simple cyst which is anechoic with posterior acoustic enhancement",
            "A benign nodule that is well-circumscribed and has a homogeneous echo pattern",
            "A benign nodule with a smooth border and an oval shape",
            "A benign nodule appearing as a solid, oval, and circumscribed mass",
            "A benign nodule with a gently lobulated but well-defined margin",
            "A benign nodule that is isoechoic and has a distinct, thin echogenic capsule",
            "A benign nodule with an oval shape, parallel orientation, and circumscribed margin",
            "A benign nodule with regular morphology and well-defined borders",
        ],
        "malignant": [
            "A malignant nodule with an irregular shape and spiculated margins",
            "A malignant nodule with a non-parallel orientation, appearing taller-than-wide",
            "A malignant nodule causing posterior acoustic shadowing",
            "A malignant nodule with indistinct or angular margins",
            "A malignant nodule containing internal microcalcifications",
            "A malignant nodule that is markedly hypoechoic and has an irregular shape",
            "A malignant nodule with a heterogeneous echo pattern and ill-defined borders",
            "A malignant nodule with microlobulated margins",
            "A malignant nodule that is irregular in shape and demonstrates posterior shadowing",
            "A malignant nodule with suspicious morphology, including an irregular shape and "
            "non-circumscribed margins",
        ],
    },
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


def official_prompts(dataset: str, classes=CLASSES[:2]) -> dict[str, list[str]]:
    """The official zero-shot script's ten prompts per class for an LN or BUSI data set."""
    key = "ln" if dataset.startswith("ln") else dataset
    if key not in OFFICIAL_PROMPTS:
        raise KeyError(f"the official code has prompts for LN and BUSI only, not {dataset!r}; "
                       f"use --prompts echocare, ensemble or a JSON file")
    missing = [c for c in classes if c not in OFFICIAL_PROMPTS[key]]
    if missing:
        raise KeyError(f"the official {key} prompts have no class {missing}: they are benign and "
                       f"malignant only; use a JSON file for more classes")
    return {c: list(OFFICIAL_PROMPTS[key][c]) for c in classes}


def echocare_prompts(organs, classes, prompt_organ: str = "") -> list[list[str]]:
    """[organ][class] EchoCare-CLIP's zero-shot prompt, each organ's own, as evaluate.py scores
    every image against its organ's prompts. `prompt_organ` puts one organ into every prompt:
    "breast" reproduces the authors' in-distribution notebook (build_label_prompt in
    echocare-clip-exp-organized-Apr25.ipynb says breast whatever the image's organ, their quirk;
    evaluate.py --prompt-organ breast)."""
    return [[ECHOCARE_TEMPLATE.format(organ=prompt_organ or o, label=c) for c in classes]
            for o in organs]


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
    """source: "official", "paper", "echocare", "ensemble" or a path to a JSON file."""
    organ = organ or DATASET_ORGAN.get(dataset) or ("lymph node" if dataset.startswith("ln") else None)
    if organ is None and source not in ("paper", "official"):
        raise ValueError(f"no organ known for data set {dataset!r}: pass --organ (e.g. breast, "
                         f"thyroid, lymph node)")
    if source == "official":
        return official_prompts(dataset, classes)
    if source == "paper":
        return paper_prompts(dataset, classes)
    if source == "echocare":
        return template_prompts([ECHOCARE_TEMPLATE], organ, classes)
    if source == "ensemble":
        return template_prompts(ENSEMBLE_TEMPLATES, organ, classes)
    return load_prompt_file(source, classes)
