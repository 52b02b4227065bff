"""Contrastive pieces (clip_us/contrastive.py): what each --train mode trains, the fixed and the
learnable temperature, the image-caption data set, validation metrics, and the official
NextGen-UIA adapter files (clip_us/adapters.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

from clip_us import contrastive as C
from clip_us import loop
from clip_us.adapters import (
    AdapterConfig,
    apply_adapter,
    convert_official_lora,
    convert_official_mona,
    is_official_mona,
)
from clip_us.captions.manifest import Pair
from clip_us.evaluation.protocol import alignment_and_retrieval
from clip_us.losses import clip_loss
from clip_us.model import build_model
from clip_us.tokenizer import tokenize

TEXT = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.")


def tiny(adapter="none", seed=0):
    torch.manual_seed(seed)
    model = build_model(config="tiny")
    apply_adapter(model, AdapterConfig(kind=adapter), freeze=False)
    return model


def batch(n=4, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = tokenize([f"caption number {i} of an ultrasound" for i in range(n)])
    return torch.randn(n, 3, size, size, generator=g), text


def expected(names, mode, adapter, learn):
    """Independent statement of each mode's parameters, from the names alone."""
    heads = {"visual.proj", "text_projection"} | ({"logit_scale"} if learn else set())
    rule = {"adapter": lambda n: "mona" in n or "lora_" in n,
            "heads": lambda n: n in heads,
            "image": lambda n: n in heads or (n.startswith("visual.") and n != "logit_scale"),
            "text": lambda n: n in heads or n.startswith(TEXT),
            "full": lambda n: n != "logit_scale" or learn}[mode]
    return {n for n in names if rule(n)}


@pytest.mark.parametrize("mode,adapter,learn", [
    ("adapter", "mona", False), ("adapter", "lora", False), ("heads", "none", True),
    ("heads", "none", False), ("image", "none", True), ("text", "none", True),
    ("full", "none", True), ("full", "none", False)])
def test_each_mode_trains_exactly_what_it_names(mode, adapter, learn, one_thread):
    model = tiny(adapter)
    names = C.set_trainable(model, mode, learn)
    want = expected([n for n, _ in model.named_parameters()], mode, adapter, learn)
    assert set(names) == want and want
    net = C.ContrastiveCLIP(model, temperature=0.0 if learn else 0.07)
    opt = loop.build_optimizer(net, loop.Settings())  # what train_contrastive.py optimises
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(model.get_parameter(n)) for n in want}
    img, txt, scale = net(*batch())
    clip_loss(img, txt, scale).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == want
    # LoRA's B starts at zero, so A gets no gradient at first; everything else moves.
    nonzero = {n for n in got if model.get_parameter(n).grad.abs().sum() > 0}
    # (The last block's Mona convolutions only reach patch tokens, which nothing reads.)
    last_conv = "resblocks.11.mona2.adapter_conv"
    assert nonzero >= {n for n in want if "lora_A" not in n and last_conv not in n}


def test_fixed_temperature_and_learnable_scale_capped_at_100():
    model = tiny()
    # The wrapper is the same CLIP: same tensors, OpenAI key names (so --init reads it).
    wrapped = C.ContrastiveCLIP(model)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert wrapped.visual.proj is model.visual.proj
    assert float(C.ContrastiveCLIP(model, 0.07).scale()) == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(500.0))
    learn = C.ContrastiveCLIP(model, 0.0)
    assert float(learn.scale().detach()) == pytest.approx(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))
    assert float(learn.scale().detach()) == pytest.approx(20.0, rel=1e-5)


def test_text_tower_runs_without_autograd_when_it_is_frozen():
    model = tiny("mona")
    C.set_trainable(model, "adapter", False)
    img, txt, _ = C.ContrastiveCLIP(model)(*batch())
    assert img.requires_grad and not txt.requires_grad
    C.set_trainable(model, "text", True)
    assert C.ContrastiveCLIP(model, 0.0)(*batch())[1].requires_grad


def test_caption_dataset_resizes_bicubic_crops_and_normalises(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 60), dtype=np.uint8)  # landscape: crop the sides
    Image.fromarray(arr).save(tmp_path / "a.png")
    long = "lesion " * 100  # far more than 77 tokens: truncated, end-of-text kept last
    pairs = [Pair("a.png", tmp_path / "a.png", long, 2)]
    raw = C.caption_dataset(pairs, size=32, clip_norm=False)[0]
    ref = Image.fromarray(arr).convert("RGB").resize((48, 32), Image.BICUBIC).crop((8, 0, 40, 32))
    ref = torch.from_numpy(np.asarray(ref, np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(raw["image"], ref)
    normed = C.caption_dataset(pairs, size=32, clip_norm=True)[0]["image"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    torch.testing.assert_close(normed, (ref - mean) / std)
    assert raw["text"].shape == (77,) and raw["text"][-1] == 49407 and raw["caption"] == long


class _Fixed(torch.nn.Module):
    """A stand-in model returning given embeddings, for validate()."""

    def __init__(self, img, txt):
        super().__init__()
        self.img, self.txt, self.temperature = img, txt, 0.07

    def scale(self):
        return torch.tensor(1 / 0.07)

    def forward(self, image, text):
        idx = image[:, 0, 0, 0].long()
        return self.img[idx], self.txt[idx], self.scale()


def test_validate_counts_identical_captions_and_matches_the_loss_by_batches():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    img[1] = img[0]  # two identical images with one caption: a strict ranking ties them and puts
    txt = img.clone()  # pair 0 first, so pair 1 misses; duplicate-aware, either is a hit for both
    captions = ["same caption", "same caption", "c", "d", "e", "f"]
    loader = [{"image": torch.arange(6.).view(6, 1, 1, 1).expand(6, 3, 1, 1),
               "text": torch.zeros(6, 77, dtype=torch.long), "index": torch.arange(6)}]
    out = C.validate(_Fixed(img, txt), loader, captions, batch_size=4, device="cpu")
    assert out["dup_i2t_R@1"] == 1.0 and out["dup_t2i_R@1"] == 1.0 and out["n"] == 6
    assert out["strict_i2t_R@1"] == out["strict_t2i_R@1"] == pytest.approx(5 / 6)
    # evaluate.py's numbers for the same embeddings, under the same names
    _, emb_img, emb_txt = C.embed(_Fixed(img, txt), loader, "cpu")
    same = alignment_and_retrieval(emb_img, emb_txt, captions)
    assert {k: out[k] for k in same} == same
    want = (clip_loss(img[:4], txt[:4], 1 / 0.07) + clip_loss(img[4:], txt[4:], 1 / 0.07)) / 2
    assert out["loss"] == pytest.approx(float(want), rel=1e-5)
    assert out["gap"] == pytest.approx(out["paired"] - out["cross"])


# ----------------------------------------------------------------------------- official files
def official_mona_file(model, seed=0, extra=()):
    """A best_model.pth as the official fine-tuning writes it: `resblocks.N.mona.<part>`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.named_parameters():
        if ".mona2." in name:
            sd[name.replace(".mona2.", ".mona.")] = 0.05 * torch.randn(p.shape, generator=g)
    for k in extra:
        sd[k] = torch.zeros(3)
    return sd


def test_official_mona_keys_map_onto_ours_and_other_variants_are_refused():
    model = tiny("mona")
    sd = official_mona_file(model)
    assert is_official_mona(sd) and not is_official_mona({"adapter_config": 1})
    settings, ours = convert_official_mona(sd)
    assert settings == {"kind": "mona", "bottleneck": 64, "placement": "after_block",
                        "mona_variant": "baseline"}
    assert set(ours) == {n for n, _ in model.named_parameters() if "mona" in n}
    noisy = official_mona_file(model, extra=["visual.transformer.resblocks.0.mona.adapter_conv."
                                             "noise_estimator.1.weight"])
    with pytest.raises(ValueError, match="noise_aware Mona.*noise_estimator"):
        convert_official_mona(noisy)


def test_official_lora_keys_map_onto_ours():
    model = tiny("lora")
    g = torch.Generator().manual_seed(0)
    lora_sd, want = {}, {}
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        v = torch.randn(p.shape, generator=g)
        want[name] = v
        block, rest = name.split(".attn.")
        official = {"lora_A_q": "q_proj.w_lora_A", "lora_B_q": "q_proj.w_lora_B",
                    "lora_A_k": "k_proj.w_lora_A", "lora_B_k": "k_proj.w_lora_B",
                    "lora_A_v": "v_proj.w_lora_A", "lora_B_v": "v_proj.w_lora_B",
                    "out_proj.lora_A": "proj.w_lora_A", "out_proj.lora_B": "proj.w_lora_B"}[rest]
        lora_sd[f"{block}.attn.{official}"] = v
    base = "visual.transformer.resblocks.0.attn.q_proj.weight"  # a frozen base weight: skipped
    lora_sd[base] = torch.zeros(64, 64)
    settings, ours = convert_official_lora({"adapter_type": "lora", "lora_r": 16, "lora_alpha": 32,
                                            "lora_dropout": 0.1, "lora_state_dict": lora_sd})
    assert settings["targets"] == ("q", "k", "v", "o") and settings["scaling"] == "rslora"
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)


def test_official_mona_file_loads_like_weights_set_by_hand(tmp_path):
    from clip_us.adapters import load_adapter
    sd = official_mona_file(tiny("mona"), seed=3)
    torch.save(sd, tmp_path / "best_model.pth")
    loaded = load_adapter(tiny(), tmp_path / "best_model.pth")  # the adapter is added
    hand = tiny("mona")
    with torch.no_grad():
        for i, block in enumerate(hand.visual.transformer.resblocks):
            for part, p in block.mona2.named_parameters():
                p.copy_(sd[f"visual.transformer.resblocks.{i}.mona.{part}"])
    x = batch()[0]
    out = loaded.eval().encode_image(x)
    assert torch.isfinite(out).all() and torch.equal(out, hand.eval().encode_image(x))
    noisy = {**sd, "visual.transformer.resblocks.3.mona.adapter_conv.noise_estimator.1.weight":
             torch.zeros(16, 64, 1, 1)}
    torch.save(noisy, tmp_path / "noise_aware.pth")
    with pytest.raises(ValueError, match="noise_aware Mona.*resblocks.3.mona.adapter_conv.noise"):
        load_adapter(tiny(), tmp_path / "noise_aware.pth")


def test_fine_tuned_tower_loads_through_init_and_normalisation_is_checked(tmp_path):
    from dataclasses import asdict

    from clip_us.adapters import checkpoint_tensors, load_adapter
    from clip_us.fileio import save_checkpoint
    model = C.ContrastiveCLIP(tiny())
    C.set_trainable(model, "image", True)
    with torch.no_grad():
        model.visual.proj.add_(1.0)
        model.visual.conv1.weight.mul_(2.0)
    save_checkpoint(tmp_path / "best.pt", {"config": {"clip_norm": False},
                                           "adapter_config": asdict(AdapterConfig()),
                                           "normalisation": {"clip_norm": False},
                                           **checkpoint_tensors(model)})
    with pytest.warns(UserWarning, match="trained on \\[0, 1\\] pixels.*--no-clip-norm"):
        clip = load_adapter(tiny(), tmp_path / "best.pt", clip_norm=True)
    assert torch.equal(clip.visual.conv1.weight, model.visual.conv1.weight)
    tower = load_adapter(tiny().visual, tmp_path / "best.pt")  # a vision tower alone
    assert torch.equal(tower.proj, model.visual.proj)
    with pytest.raises(ValueError, match="adapter 'none' but the model has 'mona'"):
        load_adapter(tiny("mona"), tmp_path / "best.pt")
