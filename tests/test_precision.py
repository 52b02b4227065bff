"""Tests for clip_us/precision.py: the --precision fallback on CPUs without native bf16, autocast
where bf16 runs, and the inference context (same numbers as a plain pass, weights untouched)."""
from __future__ import annotations

import pytest
import torch

from clip_us import precision
from clip_us.model import build_model


def test_bf16_falls_back_to_fp32_without_native_bf16(monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert precision.resolve_precision("bf16", "cpu") == "fp32"
    out = capsys.readouterr().out
    assert "--precision bf16 ignored" in out and "using fp32" in out
    assert precision.resolve_precision("fp32", "cpu") == "fp32"


def test_bf16_is_kept_where_it_runs(monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_precision("bf16", torch.device("cuda")) == "bf16"  # autocast there
    assert capsys.readouterr().out == ""
    with precision.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="fp32"):
        precision.resolve_precision("fp16", "cpu")


def test_native_bf16_reads_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert precision.native_bf16()
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(precision.platform, "system", lambda: "Linux")
    assert not precision.native_bf16()


def test_inference_context_matches_plain_pass(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    torch.manual_seed(0)
    model = build_model(config="tiny")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model.encode_image(x)
    with precision.inference(model, "bf16", "cpu") as used:
        assert used == "fp32" and torch.is_inference_mode_enabled()
        out = model.encode_image(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
