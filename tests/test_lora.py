"""LoRA (clip_us/lora.py) and the adapter switch (clip_us/adapters.py): exactness against
hand-merged weights, merging, freezing, adapter-only checkpoints and ViT-B/16 parameter counts."""
import math

import pytest
import torch

from clip_us.adapters import (
    AdapterConfig,
    adapter_config_of,
    adapter_state_dict,
    apply_adapter,
    count_parameters,
    format_count,
    load_adapter_state_dict,
)
from clip_us.lora import (
    LoRAAttention,
    LoRALinear,
    add_lora,
    lora_settings,
    mark_only_trainable,
    merge_lora,
    unmerge_lora,
)
from clip_us.model import build_model

QKV = ("q", "k", "v")


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model(config="tiny")


@pytest.fixture(scope="module")
def images():
    # 112x112: a 7x7 grid keeps the tests fast and runs the resized positional embedding too
    return torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def text():
    return torch.randint(1, 400, (2, 77), generator=torch.Generator().manual_seed(2))


def randomise_lora(model, seed=3):
    """Non-zero A and B everywhere, so every delta shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_fresh_lora_changes_nothing(images, text):
    base, model = tiny(), tiny()
    add_lora(model.visual, targets=("q", "k", "v", "o", "mlp"))
    add_lora(model.transformer)  # the text tower is optional, and causal attention must still work
    model.eval()
    assert torch.equal(model.visual(images), base.visual(images))
    assert torch.equal(model.encode_text(text), base.encode_text(text))


@pytest.mark.parametrize("targets, scaling", [
    (("q", "k", "v", "o"), "rslora"), (("k",), "standard"), (("q", "v"), "rslora"),
    (("v", "o", "mlp"), "standard")])
def test_lora_equals_hand_merged_weights(images, targets, scaling):
    # A delta applied twice, to the wrong q/k/v slice, or with the wrong scaling fails here.
    model, ref = tiny(), tiny()
    add_lora(model.visual, r=4, alpha=8, targets=targets, scaling=scaling)
    randomise_lora(model)
    s = 8 / math.sqrt(4) if scaling == "rslora" else 8 / 4
    D = model.visual.width
    with torch.no_grad():
        for blk, rblk in zip(model.visual.transformer.resblocks, ref.visual.transformer.resblocks):
            for i, t in enumerate(QKV):
                if t in targets:
                    ba = getattr(blk.attn, f"lora_B_{t}") @ getattr(blk.attn, f"lora_A_{t}")
                    rblk.attn.in_proj_weight[i * D:(i + 1) * D] += s * ba
            pairs = [(blk.attn.out_proj, rblk.attn.out_proj)] if "o" in targets else []
            if "mlp" in targets:
                pairs += [(blk.mlp.c_fc, rblk.mlp.c_fc), (blk.mlp.c_proj, rblk.mlp.c_proj)]
            for lin, rlin in pairs:
                rlin.weight += s * lin.lora_B @ lin.lora_A
    model.eval()
    out, want = model.visual(images), ref.visual(images)
    assert not torch.allclose(want, tiny().visual(images), atol=1e-4)  # the deltas matter
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_and_remove(images):
    model = tiny()
    add_lora(model.visual, targets=("q", "v", "o", "mlp"))
    randomise_lora(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model.visual(images)
    merge_lora(model)
    merge_lora(model)  # a second merge must not add the deltas twice
    assert not torch.equal(model.visual.transformer.resblocks[0].attn.in_proj_weight,
                           before["visual.transformer.resblocks.0.attn.in_proj_weight"])
    torch.testing.assert_close(model.visual(images), unmerged, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    merge_lora(model, remove=True)
    assert not any(isinstance(m, (LoRAAttention, LoRALinear)) for m in model.modules())
    plain = build_model(config="tiny")
    plain.load_state_dict(model.state_dict(), strict=True)  # OpenAI keys only, nothing renamed
    torch.testing.assert_close(plain.visual(images), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_keeps_openai_keys():
    model = tiny()
    base_keys = set(model.state_dict())
    add_lora(model.visual, targets=("q", "k", "v", "o", "mlp"))
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert all("lora_" in k for k in keys - base_keys)
    assert "visual.transformer.resblocks.0.attn.lora_A_q" in keys
    assert "visual.transformer.resblocks.11.attn.out_proj.lora_B" in keys


def test_dropout_acts_on_lora_path_only_in_training(images):
    model = tiny()
    add_lora(model.visual, dropout=0.5)
    randomise_lora(model)
    model.train()
    torch.manual_seed(0)
    a = model.visual(images)
    torch.manual_seed(1)
    assert not torch.allclose(a, model.visual(images))  # dropout on the LoRA input is live
    model.eval()
    assert torch.equal(model.visual(images), model.visual(images))


def test_shared_dropout_one_mask_for_q_k_v(images):
    """--lora-shared-dropout: one draw per block shared by q, k and v (same output in eval mode;
    in training, equal A/B give equal q/k/v deltas only when the mask is shared)."""
    shared, independent = tiny(), tiny()
    add_lora(shared.visual, dropout=0.5, shared_dropout=True)
    add_lora(independent.visual, dropout=0.5)
    randomise_lora(shared)
    independent.load_state_dict(shared.state_dict())
    assert lora_settings(shared.visual)["shared_dropout"]
    assert not lora_settings(independent.visual)["shared_dropout"]
    shared.eval(), independent.eval()
    torch.testing.assert_close(shared.visual(images), independent.visual(images))
    x = torch.randn(2, 10, 64)
    for model, equal in ((shared, True), (independent, False)):
        attn = model.visual.transformer.resblocks[0].attn.train()
        with torch.no_grad():
            for t in QKV:
                getattr(attn, f"lora_A_{t}").copy_(attn.lora_A_q)
                getattr(attn, f"lora_B_{t}").copy_(attn.lora_B_q)
            base = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = (attn.in_proj(x) - base).chunk(3, dim=-1)  # the three deltas
        same = [torch.allclose(a, b, atol=1e-5) for a, b in ((q, k), (k, v))]  # up to rounding
        assert same == [equal, equal]


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.0371])
def test_keep_mask_is_bernoulli(p):
    """keep_mask's elements are independent draws, False with probability p: the drop rate is
    within 5 standard errors of p, and neighbours are uncorrelated (a bit pattern shared
    between the bytes of one 64-bit word would correlate them)."""
    from clip_us.lora import keep_mask
    torch.manual_seed(0)
    n = 2_000_000
    drop = (~keep_mask((n,), p)).double()
    assert abs(drop.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    for lag in (1, 2, 7, 8):
        corr = torch.corrcoef(torch.stack([drop[:-lag], drop[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)
    assert keep_mask((3, 5, 7), p).shape == (3, 5, 7)


def test_keep_mask_ends():
    """p = 0 keeps everything, p = 1 (or within 2^-33 of it, past int32's range) drops
    everything, and a p outside [0, 1] is refused."""
    from clip_us.lora import keep_mask
    assert keep_mask((1000,), 0.0).all()
    assert not keep_mask((1000,), 1.0).any() and not keep_mask((1000,), 1 - 1e-11).any()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        keep_mask((10,), 1.5)


def test_dropout_linear_is_dropout_then_linear():
    """On the CPU in training, dropout_linear(x, A) = linear(x * mask / (1 - p), A) for the mask
    keep_mask draws, gradients included; in eval it is linear(x, A)."""
    from clip_us.lora import dropout_linear, keep_mask
    x = torch.randn(4, 9, 32, requires_grad=True)
    A = torch.randn(8, 32, requires_grad=True)
    drop = torch.nn.Dropout(0.3)
    torch.manual_seed(5)
    out = dropout_linear(x, A, drop)
    out.backward(torch.ones_like(out))
    grads = x.grad.clone(), A.grad.clone()
    torch.manual_seed(5)
    mask = keep_mask(x.shape, 0.3)
    x.grad = A.grad = None
    ref = torch.nn.functional.linear(x * mask / 0.7, A)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grads, (x.grad, A.grad))
    assert 0.5 < mask.float().mean() < 0.9
    drop.eval()
    torch.testing.assert_close(dropout_linear(x, A, drop), torch.nn.functional.linear(x, A))


def test_only_adapters_get_gradients(images):
    model = tiny()
    apply_adapter(model, AdapterConfig(kind="lora"))  # freezes everything but LoRA
    model.train()
    model.visual(images).square().sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_mark_only_trainable_needs_a_match():
    with pytest.raises(ValueError, match="add_lora"):
        mark_only_trainable(tiny())


def test_bad_arguments():
    with pytest.raises(ValueError, match="targets"):
        add_lora(tiny().visual, targets=("x",))
    with pytest.raises(ValueError, match="scaling"):
        add_lora(tiny().visual, scaling="half")
    model = tiny()
    add_lora(model.visual)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model.visual)
    with pytest.raises(ValueError, match="adapter kind"):
        AdapterConfig(kind="prefix")


def test_adapter_checkpoint_round_trip(tmp_path, images):
    cfg = AdapterConfig(kind="lora", r=8, targets=("q", "v", "o"))
    model = apply_adapter(tiny(), cfg)
    randomise_lora(model)
    sd = adapter_state_dict(model)
    assert sd and all("lora_" in k for k in sd)
    path = tmp_path / "adapter.pt"
    torch.save({"adapter_config": cfg.__dict__, "adapter_state_dict": sd}, path)
    ckpt = torch.load(path, weights_only=True)
    fresh = apply_adapter(tiny(), AdapterConfig(kind="lora", r=8, targets=("o", "q", "v")))
    load_adapter_state_dict(fresh, ckpt["adapter_state_dict"], ckpt["adapter_config"])
    model.eval(), fresh.eval()
    assert torch.equal(fresh.visual(images), model.visual(images))
    assert adapter_config_of(fresh).r == 8


@pytest.mark.parametrize("saved, built, message", [
    (dict(r=8), dict(r=16), "LoRA r=8 but the model has r=16"),
    (dict(scaling="standard"), dict(), "scaling=standard but the model has scaling=rslora"),
    (dict(targets=("q", "v")), dict(), "targets=q,v but the model has targets=q,k,v,o"),
    (dict(alpha=16.0), dict(), "alpha=16.0 but the model has alpha=32"),
])
def test_mismatched_settings_are_named(saved, built, message):
    src = apply_adapter(tiny(), AdapterConfig(kind="lora", **saved))
    dst = apply_adapter(tiny(), AdapterConfig(kind="lora", **built))
    with pytest.raises(ValueError, match=message):
        load_adapter_state_dict(dst, adapter_state_dict(src), AdapterConfig(kind="lora", **saved))


def test_kind_mismatch_missing_keys_and_merged_model():
    src = apply_adapter(tiny(), AdapterConfig(kind="lora"))
    sd = adapter_state_dict(src)
    with pytest.raises(ValueError, match="checkpoint has adapter 'lora' but the model has 'mona'"):
        load_adapter_state_dict(apply_adapter(tiny(), AdapterConfig(kind="mona")), sd,
                                {"kind": "lora"})
    dst = apply_adapter(tiny(), AdapterConfig(kind="lora"))
    partial = {k: v for k, v in sd.items() if "resblocks.5." not in k}
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        load_adapter_state_dict(dst, partial, {"kind": "lora"})
    merge_lora(dst)
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_adapter_state_dict(dst, sd, {"kind": "lora"})


# ----------------------------------------------------------------------------- ViT-B/16 counts
# Built on the meta device: shapes without memory or init time, so every setting is cheap.
def vit_b16_visual():
    with torch.device("meta"):
        return build_model(config="ViT-B/16").visual


BASE = 86_192_640  # ViT-B/16 vision tower; checked against its own closed form below


def test_vit_b16_base_count():
    D, L, P, grid, out = 768, 12, 16, 14, 512
    block = (3 * D * D + 3 * D) + (D * D + D) + 2 * 2 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)
    total = 3 * D * P * P + D + (grid * grid + 1) * D + 2 * D + L * block + 2 * D + D * out
    assert total == BASE == count_parameters(vit_b16_visual())[1]


@pytest.mark.parametrize("r, targets", [(16, ("q", "k", "v", "o")), (8, ("q", "v")),
                                        (4, ("q", "k", "v", "o", "mlp")), (16, ("o",))])
def test_vit_b16_lora_counts(r, targets):
    D, L = 768, 12
    # Per block: q/k/v/o each get A [r, D] and B [D, r]; mlp adds c_fc (A [r, D], B [4D, r]) and
    # c_proj (A [r, 4D], B [D, r]).
    per_block = sum(2 * r * D for t in targets if t != "mlp")
    per_block += 10 * r * D if "mlp" in targets else 0
    visual = apply_adapter(vit_b16_visual(), AdapterConfig(kind="lora", r=r, targets=targets))
    assert count_parameters(visual) == (L * per_block, BASE + L * per_block)


def test_vit_b16_lora_default_message():
    visual = apply_adapter(vit_b16_visual(), AdapterConfig(kind="lora"))
    assert format_count(visual) == "trainable 1,179,648 / 87,372,288 (1.35%)"


# ----------------------------------------------------------------------------- torch's own MHA
@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_on_torch_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    plain = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    plain.load_state_dict(mha.state_dict())
    holder = torch.nn.Sequential()
    holder.attn = mha
    add_lora(holder, r=4)
    assert isinstance(holder.attn, LoRAAttention) and isinstance(holder.attn.out_proj, LoRALinear)
    assert set(holder.state_dict()) >= {"attn.in_proj_weight", "attn.lora_A_q", "attn.out_proj.lora_B"}
    x, y = (torch.randn((2, 5, 16) if batch_first else (5, 2, 16)) for _ in range(2))
    masks = {"key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2]),
             "attn_mask": torch.eye(5, dtype=torch.bool).roll(1, 0)}
    for args in ((x, x, x), (x, y, y)):  # self- and cross-attention: a fresh LoRA changes nothing
        for kw in ({}, masks, {"attn_mask": torch.randn(5, 5), "need_weights": False}):
            ours, ref = holder.attn(*args, **kw), plain(*args, **kw)
            torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=1e-5)
            assert (ours[1] is None) == (ref[1] is None)
    randomise_lora(holder)
    out = holder.attn(x, x, x)[0]
    # The packed delta equals the hand-merged weights of a plain MHA.
    with torch.no_grad():
        for i, t in enumerate(QKV):
            plain.in_proj_weight[i * 16:(i + 1) * 16] += holder.attn.delta_weight(t)
        plain.out_proj.weight += holder.attn.out_proj.delta_weight()
    torch.testing.assert_close(out, plain(x, x, x)[0], atol=1e-5, rtol=1e-4)
    merge_lora(holder, remove=True)
    assert type(holder.attn) is torch.nn.MultiheadAttention
    torch.testing.assert_close(holder.attn(x, x, x)[0], out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("targets", [("q", "k", "v", "o"), ("o",), ("v",)])
def test_add_lora_on_a_bare_multihead_attention_returns_the_lora_block(targets):
    """A bare attention block cannot replace itself in a parent: add_lora returns the LoRA block
    (same parameter objects) and leaves the module it was given as it was; never a no-op."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = mha(x, x, x)[0]
    adapted = add_lora(mha, r=4, dropout=0.0, targets=targets)
    assert isinstance(adapted, LoRAAttention) and isinstance(adapted, torch.nn.MultiheadAttention)
    assert adapted.in_proj_weight is mha.in_proj_weight
    assert type(mha.out_proj) is not LoRALinear and not any("lora_" in k for k in mha.state_dict())
    randomise_lora(adapted)
    with torch.no_grad():
        out = adapted(x, x, x)[0]
        torch.testing.assert_close(mha(x, x, x)[0], before)  # the original is untouched
    assert not torch.allclose(out, before, atol=1e-4)  # the LoRA tensors reach the output
    plain = merge_lora(adapted, remove=True)
    assert type(plain) is torch.nn.MultiheadAttention and type(plain.out_proj) is not LoRALinear
    assert not any("lora_" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x, x, x)[0], out, atol=1e-5, rtol=1e-4)
