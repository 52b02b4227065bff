"""EchoCare-CLIP's LLM captions as its authors made them: `refine --mode echocare`.

What `training_experiments/generate_llm_captions.py` (TongxinWang0405/BMI702_project) does, with
our manifest in place of its split files and any OpenAI-compatible server in place of vLLM:

- rows of data sets whose name contains buscot, carotid or usdata keep their caption (the authors'
  `_NATURAL_CAPTION_TOKENS`: those captions are natural language already);
- lung rows are rewritten from their caption (fields `Tissue: lung`, `OriginalCaption: ...`), as
  the authors' `load_lung` does, since their lung metadata could not be matched to the images;
- every other row is written from its structured fields: `Tissue` (our organ column), `Condition`
  (our label column, lower case) and the other metadata columns, keys humanised as theirs
  (`birads` -> `BI-RADS`, `_` and `.` -> space). On the authors' data that is BUSI, Thyroid and
  Liver (Tissue and Condition) and BrEaST (its clinical-data columns);
- one request per row: their system prompt, then `Dataset: <name>`, the fields and their closing
  line, sampled with temperature 1.0, top_p 0.95, repetition penalty 1.05, 320 new tokens and
  vLLM's per-request `seed` 42 (their `SamplingParams`); default model Qwen/Qwen3-4B-Instruct-2507;
- every non-empty line of the reply is a candidate (numbering, bullets and quotes removed); one
  `random.Random(seed)` then draws `rng.choice` per image, in row order (their `pick_caption`).

The order of the draws is ours (manifest rows); theirs was the unique images of their train, val,
test, full and held-out splits in turn, so the same seed picks the same way only on the same
order. The texts below are the authors' data, copied character for character.
"""
from __future__ import annotations

import random
import re

from ..labels import CLASSES, parse_label
from .manifest import ManifestError

SYSTEM_PROMPT = """You are a radiology assistant writing English captions for ultrasound images.
You are given structured metadata fields (key: value pairs) from a clinical dataset.
Produce THREE DIFFERENT captions for the SAME image.

Content rules (apply to every caption):
- Ground the caption ONLY in the provided fields. Never invent values, measurements, or findings.
- Incorporate EVERY provided field (diagnosis, BI-RADS, pathology, anatomical region, lesion descriptors, patient demographics, findings, etc.). Do not omit any.
- Read like natural clinical language written by a radiologist, not a key-value dump.
- Length: 15 to 60 words, one to three sentences. Length should scale with the number of provided fields: shorter captions (~15-25 words) when few fields are given, and longer captions (up to ~40-60 words, two or more sentences) when many fields are given, so that every field is naturally incorporated.

Diversity rules (across the three captions):
- Captions must differ meaningfully in wording, sentence structure, tone, or emphasis.
- Suggested variants: (1) concise and clinical, (2) descriptive and narrative, (3) reorder the emphasis.
- No near-duplicates or trivial paraphrases.

Output format (MUST follow exactly):
- Return ONLY the three captions, nothing else.
- Each caption is on its own single line.
- Prefix each line with "1. ", "2. ", "3. " (number, period, space) — no other numbering style.
- No preamble, no labels like "Caption 1:", no bullets, no quotation marks, no blank lines between captions, no trailing commentary.

Example of the required output format (content is illustrative only):
1. First caption text here.
2. Second caption text here.
3. Third caption text here."""  # noqa: E501 (the authors' text, line for line)

USER_PROMPT = ("Dataset: {dataset}\n"
               "Structured fields:\n{fields_block}\n\n"
               "Write the three captions now, following the output format exactly.")

SKIP_TOKENS = ("buscot", "carotid", "usdata")   # data sets with natural captions: kept as is
LUNG_TOKEN = "lung"                              # the authors' "Lung_ultrasound" folder
MODEL = "Qwen/Qwen3-4B-Instruct-2507"
SEED = 42
# The authors' clean_value: these values (after strip, any case) are no value at all.
MISSING = {"", "nan", "none", "null", "unknown", "n/a", "na", "-"}
# Columns that are not structured fields of the image.
NOT_FIELDS = {"image", "caption", "original_caption", "refine_status", "tier", "split", "dataset",
              "organ", "label"}
THINK = re.compile(r"<think>.*?(</think>|$)", re.S)
# A candidate line: optional "1." / "(2)" / "3:" numbering or a "-" / "*" bullet, then the text.
CANDIDATE = re.compile(r"^\s*(?:\(?\d+[.):]|-|\*)\s*(.+?)\s*$")


def clean_value(value) -> str | None:
    text = "" if value is None else str(value).strip()
    return None if text.lower() in MISSING else text


def humanize_key(column: str) -> str:
    """A column name as the authors print it: 'Posterior_features' -> 'Posterior features',
    'birads' -> 'BI-RADS'."""
    key = column.replace("_", " ").replace(".", " ").strip()
    return "BI-RADS" if key.lower() == "birads" else key


def _condition(label: str) -> str:
    parsed = parse_label(label)
    return CLASSES[parsed] if parsed is not None else label.lower()


def row_fields(row: dict, dataset: str, caption_col: str) -> dict:
    """{field: value} of one row: lung from its caption, the rest from organ, label and the other
    metadata columns (the caption and bookkeeping columns left out)."""
    if LUNG_TOKEN in dataset.lower():
        caption = clean_value(row.get(caption_col))
        return {"Tissue": "lung", "OriginalCaption": caption} if caption else {}
    fields = {}
    if organ := clean_value(row.get("organ")):
        fields["Tissue"] = organ
    if label := clean_value(row.get("label")):
        fields["Condition"] = _condition(label)
    skip = NOT_FIELDS | {caption_col.lower()}
    for column, value in row.items():
        if column.lower() not in skip and (text := clean_value(value)) is not None:
            fields[humanize_key(column)] = text
    return fields


def skipped(dataset: str) -> bool:
    """The data sets the authors leave alone (natural captions)."""
    return any(token in dataset.lower() for token in SKIP_TOKENS)


def messages(row: dict, index: int, caption_col: str) -> list | None:
    """The chat messages of one row, or None for a skipped data set. A row with no dataset name or
    no fields is an error, as in the authors' loaders."""
    dataset = clean_value(row.get("dataset"))
    if dataset is None:
        raise ManifestError(f"row {index} (0-based): no dataset name; --mode echocare needs a dataset column "
                            f"(its `Dataset:` line and skip list read it; `template "
                            f"--dataset-name` writes one)")
    if skipped(dataset):
        return None
    fields = row_fields(row, dataset, caption_col)
    if not fields:
        raise ManifestError(f"row {index} (0-based, {dataset}): no metadata fields to write from (organ, "
                            f"label or attribute columns); the authors' loaders stop here too")
    block = "\n".join(f"- {k}: {v}" for k, v in fields.items())
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(dataset=dataset, fields_block=block)}]


def candidates(text: str) -> list:
    """The authors' parse_candidates: every non-empty line without its numbering or bullet and
    its quotes, whitespace collapsed; no such line -> the whole reply. Hidden reasoning
    (<think>) is dropped first (their instruct model writes none)."""
    raw = THINK.sub("", text).strip().strip("`").strip()
    out = []
    for line in raw.splitlines():
        m = CANDIDATE.match(line)
        body = (m.group(1) if m else line).strip().strip("\"'").strip()
        if body:
            out.append(" ".join(body.split()))
    return out or ([" ".join(raw.split())] if raw.strip() else [])


def picker(seed: int):
    """pick(image, reply) -> caption: one random.Random(seed) drawing rng.choice over each image's
    candidates in turn, as the authors' pick_caption; an image met again keeps its first pick."""
    rng, picked = random.Random(seed), {}

    def pick(image: str, reply: str) -> str:
        if image not in picked:
            picked[image] = rng.choice(candidates(reply))
        return picked[image]
    return pick
