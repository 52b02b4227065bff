"""Tests for clip_us/precision.py: the --precision fallback on CPUs without native bf16, autocast
where bf16 runs, and the inference context (same numbers as a plain pass, weights untouched)."""
from __future__ import annotations

import json

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
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_precision("bf16", torch.device("cuda")) == "bf16"  # autocast there
    assert capsys.readouterr().out == ""
    with precision.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with precision.autocast("bf16", "cpu", cuda_only=True):  # training's --amp: CUDA only
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_falls_back_on_a_gpu_without_it(monkeypatch, capsys):
    """A pre-Ampere GPU (V100, T4) has no bf16 tensor cores: fp32, with a message."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert precision.resolve_precision("bf16", "cuda") == "fp32"
    assert "Tesla V100 has no native bf16; using fp32" in capsys.readouterr().out


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


def test_cpu_bf16_pass_casts_the_weights_once_and_gives_them_back(monkeypatch):
    """On a CPU with native bf16 (forced here; emulated, slow but exact in kind) the pass runs on
    bf16 copies of the matrix weights, with a cosine >= 0.999 to fp32; afterwards the model
    holds its own fp32 Parameter objects and an unchanged state_dict."""
    from clip_us.lora import add_lora
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    torch.manual_seed(0)
    model = add_lora(build_model(config="tiny")).eval()  # LoRA layers are cast as well
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model.encode_image(x)
    block = model.visual.transformer.resblocks[0]
    with precision.inference(model, "bf16", "cpu"):
        dtypes = {block.attn.in_proj_weight.dtype, block.attn.out_proj.weight.dtype,
                  block.mlp.c_fc.weight.dtype, model.visual.conv1.weight.dtype}
        assert dtypes == {torch.bfloat16} and block.ln_1.weight.dtype == torch.float32
        out = model.encode_image(x).float()
    assert torch.nn.functional.cosine_similarity(out, ref).min() >= 0.999
    assert [id(p) for p in model.parameters()] == params
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# ----------------------------------------------------------------------------- the scripts
TINY = ["--arch", "tiny", "--weights", "none", "--image-size", "64", "--workers", "0"]
PHANTOM = ["--phantom-n", "24", "--phantom-size", "128"]
SUPERVISED = TINY + PHANTOM + ["--seeds", "1", "--batch-size", "8", "--epochs", "2",
                               "--eval-every", "1", "--eval-at", "every", "--reduce-dim", "32",
                               "--n-figures", "1"]  # validation after each of the two epochs
SCRIPTS = {  # script: (arguments, where its results.json is, under --out-dir)
    "train_seg.py": (SUPERVISED + ["--adapter", "lora"], "results.json"),
    "train_cls.py": (SUPERVISED + ["--adapter", "mona"], "results.json"),
    "train_contrastive.py": (TINY + PHANTOM + ["--train", "heads", "--epochs", "2",
                                               "--batch-size", "8"], "results.json"),
    "zeroshot.py": (TINY + PHANTOM, "results.json"),
    "evaluate.py": (["--weights", "none", "--arch", "tiny", "--image-size", "64", "--workers",
                     "0", "--probe-fractions", "0.3", "--probe-seeds", "42", "--e2e-fractions",
                     "0.3", "--e2e-seeds", "42", "--e2e-epochs", "1", "--bootstrap", "0"],
                    "clip-random-weights/results.json"),
}


@pytest.fixture(scope="module")
def caption_manifest(tmp_path_factory):
    from clip_us import phantom
    from clip_us.captions import phantom_manifest
    cfg = phantom.PhantomConfig(n=30, size=96, organs=("breast", "thyroid"), p_normal=0.0)
    return phantom_manifest(tmp_path_factory.mktemp("phantom"), cfg)


def forward_events(run) -> list:
    """[(gradients on, module class, output dtype)] of every module forward while run() ran, in
    order: training steps run with gradients on; validation, test and inference passes off."""
    seen = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            seen.append((torch.is_grad_enabled(), type(module).__name__, output.dtype))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_feature_cache_is_keyed_on_the_precision_that_ran(monkeypatch, capsys):
    """evaluate.py's cached features of a bf16 run are not reused for fp32, and a bf16 request
    that fell back to fp32 shares fp32's cache (the key is what ran)."""
    from clip_us.evaluation import models as evalmodels
    key = {}
    for native, asked in ((True, "fp32"), (True, "bf16"), (False, "bf16")):
        monkeypatch.setattr(precision, "native_bf16", lambda: native)
        key[native, asked] = evalmodels.from_weights("none", "tiny", 64, "cpu",
                                                     precision=asked).fingerprint()
    assert key[True, "bf16"] != key[True, "fp32"] == key[False, "bf16"]
    assert capsys.readouterr().out.count("--precision bf16 ignored") == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_precision_flag_reaches_every_inference_pass(script, tmp_path, monkeypatch, capsys,
                                                     run_script, caption_manifest):
    """--precision bf16 runs the script's inference passes in bf16 where the CPU has it (native
    bf16 forced on here, so bf16 is emulated, slowly but correctly), with QuickGELU folded into
    one SiLU; without native bf16 the script says so and runs fp32; results.json records what
    ran."""
    args, results = SCRIPTS[script]
    if script == "evaluate.py":
        args = args + ["--manifest", caption_manifest]
    env = {"CLIP_US_CACHE": tmp_path / "cache"}
    ran = {}
    for native in (True, False):
        monkeypatch.setattr(precision, "native_bf16", lambda: native)
        out = tmp_path / f"native-{native}"
        ran[native] = forward_events(lambda: run_script(
            script, args + ["--precision", "bf16", "--out-dir", out], env))
        used = json.loads((out / results).read_text())["precision"]
        assert used == ("bf16" if native else "fp32")
        assert ("--precision bf16 ignored" in capsys.readouterr().out) == (not native)
    assert (False, "Linear", torch.bfloat16) in ran[True]
    assert not any(dtype == torch.bfloat16 for _, _, dtype in ran[False])
    assert (False, "SiLU", torch.float32) in ran[False]  # QuickGELU folded (folded_quick_gelu)
    steps = [i for i, (grad, _, _) in enumerate(ran[True]) if grad]
    if steps:  # a training script: validation between its two epochs, and the final pass
        bf16 = [i for i, (grad, _, dtype) in enumerate(ran[True])
                if not grad and dtype == torch.bfloat16]
        assert any(steps[0] < i < steps[-1] for i in bf16) and bf16[-1] > steps[-1]
        assert not any(dtype == torch.bfloat16 for grad, _, dtype in ran[True] if grad)
