"""Prompts: the paper's text, the 77-token limit, and prompt-file errors."""
import json

import pytest

from clip_us.evaluation import prompts
from clip_us.tokenizer import tokenize


def test_paper_prompts_fill_the_class_and_fit_77_tokens():
    for ds in ("busi", "ln1", "ln2"):
        p = prompts.get_prompts("paper", ds)
        assert list(p) == ["benign", "malignant"]
        assert p["malignant"][0].endswith("scan is malignant")
        tokenize([t for v in p.values() for t in v])  # raises if any is over 77 tokens


def test_paper_prompts_only_for_ln_and_busi():
    with pytest.raises(KeyError, match="LN and BUSI"):
        prompts.get_prompts("paper", "tn3k")


def test_echocare_and_ensemble():
    p = prompts.get_prompts("echocare", "tn3k")
    assert p["benign"] == ["An ultrasound image of thyroid with benign findings."]
    e = prompts.get_prompts("ensemble", "busi")
    assert len(e["benign"]) == len(e["malignant"]) == 10
    tokenize(e["benign"] + e["malignant"])


def test_prompt_file(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"benign": ["a benign lesion"], "malignant": "a malignant lesion"}))
    assert prompts.get_prompts(str(good), "busi")["malignant"] == ["a malignant lesion"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benign": ["x"]}))
    with pytest.raises(ValueError, match="malignant"):
        prompts.get_prompts(str(bad), "busi")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        prompts.get_prompts(str(broken), "busi")


def test_unknown_dataset_needs_an_organ():
    with pytest.raises(ValueError, match="--organ"):
        prompts.get_prompts("echocare", "mystery")
    assert prompts.get_prompts("echocare", "mystery", organ="liver")["benign"] == [
        "An ultrasound image of liver with benign findings."]
    assert "lymph node" in prompts.get_prompts("echocare", "ln")["malignant"][0]
