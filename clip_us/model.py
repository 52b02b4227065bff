"""CLIP's vision and text transformers, written from scratch with OpenAI's parameter names.

Follows Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(2021) and OpenAI's `clip/model.py`: pre-LN residual blocks with packed q/k/v projections, a
patch-embedding ViT with a class token, and a causal text transformer pooled at the end-of-text
token. Every parameter keeps OpenAI's key name (`visual.conv1.weight`,
`visual.transformer.resblocks.N.attn.in_proj_weight`, `.mlp.c_fc`, `ln_1`, ...), so an OpenAI
state dict loads with `strict=True`, and adapters (lora.py, mona.py) only add keys.

Differences from OpenAI's code, none of which change the numbers:
- tokens are batch-first ([B, L, D]) instead of [L, B, D];
- attention goes through `F.scaled_dot_product_attention`; the text tower uses `is_causal=True`
  instead of a materialised mask;
- the vision tower can return chosen blocks' outputs for dense heads (`return_blocks`),
  and interpolates its positional embedding (bicubic) for other input sizes.

The one vision transformer also covers the other ViTs that feed the same heads (timm's ViT inside
BiomedCLIP, DINOv2), through keyword options whose defaults are CLIP's: the activation, whether
`ln_pre` exists, the LayerNorm epsilon, a bias on the patch embedding, the projection (a matrix,
optionally with a bias, or none), and layer-scale (`ls_1`/`ls_2.gamma`, open_clip's names).
Key-name maps from each authors' format to these names live in backbones.py.

This file imports nothing else from clip_us, so it can be copied on its own.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CLIPConfig:
    """Every size of a CLIP model. `build_model` infers these from a state dict."""
    embed_dim: int = 512
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_heads: int = 12
    vision_patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    # QuickGELU for OpenAI's and MetaCLIP's weights, exact GELU for most others (open_clip).
    quick_gelu: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


# Named architectures. "tiny" keeps every code path of ViT-B/16 (12 blocks, patch 16, the dense
# block indices 3/6/9) at width 64, for unit tests and quick demos.
ARCHS = {
    "ViT-B/32": CLIPConfig(vision_patch_size=32),
    "ViT-B/16": CLIPConfig(),
    "ViT-L/14": CLIPConfig(embed_dim=768, vision_layers=24, vision_width=1024, vision_heads=16,
                           vision_patch_size=14, transformer_width=768, transformer_heads=12),
    "ViT-L/14@336px": CLIPConfig(embed_dim=768, image_resolution=336, vision_layers=24,
                                 vision_width=1024, vision_heads=16, vision_patch_size=14,
                                 transformer_width=768, transformer_heads=12),
    "tiny": CLIPConfig(embed_dim=64, vision_width=64, vision_heads=2, transformer_width=64,
                       transformer_heads=2),
}


QUICK_GELU_SCALE = 1.702


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names.

    q, k and v share one packed projection (`in_proj_weight`, rows ordered q, k, v), as in OpenAI's
    checkpoints. `in_proj` is a method so that LoRA can add its packed delta without renaming keys.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.in_proj_weight, self.in_proj_bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.in_proj(x).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = out.transpose(1, 2).reshape(B, L, D)  # [B, heads, L, hd] -> [B, L, D]
        return self.out_proj(out)


class MLP(nn.Sequential):
    """c_fc -> activation -> c_proj, as an nn.Sequential so the keys are `mlp.c_fc.*`."""

    def __init__(self, width: int, quick_gelu: bool):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DINOv2's ls1/ls2; CaiT). `gamma` as in open_clip."""

    def __init__(self, width: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    With `layer_scale`, each branch is scaled per channel before the residual sum (ls_1, ls_2), as
    DINOv2's blocks are; without it, ls_1/ls_2 are identities and add no keys.
    """

    def __init__(self, width: int, heads: int, quick_gelu: bool = True, ln_eps: float = 1e-5,
                 layer_scale: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, quick_gelu)
        self.ls_1 = LayerScale(width) if layer_scale else nn.Identity()
        self.ls_2 = LayerScale(width) if layer_scale else nn.Identity()

    def attn_residual(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        return x + self.ls_1(self.attn(self.ln_1(x), causal=causal))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls_2(self.mlp(self.ln_2(x)))

    def forward(self, x: torch.Tensor, causal: bool = False, grid: tuple | None = None):
        # `grid` is the (rows, cols) patch layout of a vision sequence [CLS, patches...]. The plain
        # block ignores it; adapters that work on the spatial grid (mona.py) need it.
        return self.mlp_residual(self.attn_residual(x, causal=causal))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True,
                 ln_eps: float = 1e-5, layer_scale: bool = False):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, quick_gelu, ln_eps, layer_scale)
              for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    """ViT image encoder: patches + class token -> transformer -> ln_post(CLS) @ proj.

    The keyword options describe the other ViTs this file builds; their defaults are CLIP's:
    - `pre_norm`: CLIP's `ln_pre` on the embedded tokens; timm's ViT and DINOv2 have none.
    - `ln_eps`: LayerNorm epsilon (1e-5 in CLIP, 1e-6 in timm's ViT and DINOv2).
    - `patch_bias`: a bias on the patch embedding (`conv1.bias`; timm and DINOv2 have one).
    - `output_dim`: the projection `proj` [width, output_dim] (x @ proj, OpenAI's layout);
      0 means none (DINOv2), and the pooled output is then ln_post(CLS) of size width.
    - `proj_bias`: a bias after the projection (`proj_bias`), for linear heads that have one.
    - `layer_scale`: DINOv2's per-channel scales on both residual branches (`ls_1/ls_2.gamma`).
    `ln_post` is the final norm: CLIP applies it to the pooled CLS token only, timm and DINOv2 to
    every token; for the pooled CLS token the two are the same, and `norm=True` in `forward`
    applies it to the returned blocks, like DINOv2's `get_intermediate_layers(norm=True)`.
    """

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int, quick_gelu: bool = True, *, pre_norm: bool = True,
                 ln_eps: float = 1e-5, patch_bias: bool = False, proj_bias: bool = False,
                 layer_scale: bool = False):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        self.output_dim = output_dim or width
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size,
                               bias=patch_bias)
        scale = width ** -0.5
        grid = input_resolution // patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=ln_eps) if pre_norm else nn.Identity()
        self.transformer = Transformer(width, layers, heads, quick_gelu, ln_eps, layer_scale)
        self.ln_post = nn.LayerNorm(width, eps=ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim)) if output_dim else None
        self.proj_bias = nn.Parameter(torch.zeros(output_dim)) if output_dim and proj_bias else None

    @property
    def width(self) -> int:
        return self.conv1.out_channels

    def pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embedding for a `grid` of patches, bicubically resized when it differs."""
        pos = self.positional_embedding
        old = int(math.sqrt(pos.shape[0] - 1))
        if (old, old) == tuple(grid):
            return pos
        patch = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, D, old, old]
        patch = F.interpolate(patch.float(), size=grid, mode="bicubic", align_corners=False)
        patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)  # [HW, D]
        return torch.cat([pos[:1], patch])

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pixels [B, 3, H, W] -> ln_pre(tokens) [B, 1 + h*w, D], CLS first, and the grid (h, w)."""
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, D, h, w]
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.pos_embed(grid).to(x.dtype)
        return self.ln_pre(x), grid

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, 1 + h*w, D] -> ln_post(CLS), projected when the model has a projection."""
        x = self.ln_post(x[:, 0])
        if self.proj is not None:
            x = x @ self.proj
        return x if self.proj_bias is None else x + self.proj_bias

    def forward(self, x: torch.Tensor, return_blocks: tuple[int, ...] | None = None,
                pool: bool = True, norm: bool = False):
        """Encode images.

        Without `return_blocks`: the pooled embedding [B, output_dim].
        With `return_blocks=(3, 6, 9)`: a tuple (pooled or None, [block outputs]), each output
        [B, 1 + h*w, width] with CLS first, taken after that block (and its adapters). With
        `pool=False` the forward stops after the deepest requested block and pooled is None.
        `norm=True` passes each returned block through the final norm `ln_post`.
        """
        x, grid = self.embed(x)
        wanted = set(return_blocks or ())
        if wanted and not all(0 <= i < self.transformer.layers for i in wanted):
            raise ValueError(f"return_blocks {sorted(wanted)} out of range for "
                             f"{self.transformer.layers} blocks")
        last = max(wanted) if wanted and not pool else self.transformer.layers - 1
        feats = []
        for i, block in enumerate(self.transformer.resblocks[: last + 1]):
            x = block(x, grid=grid)
            if i in wanted:
                feats.append(self.ln_post(x) if norm else x)
        pooled = self.pool(x) if pool else None
        return pooled if return_blocks is None else (pooled, feats)


@torch.no_grad()
def init_transformer(tower: Transformer) -> None:
    """OpenAI's initialisation of a tower's blocks (their `initialize_parameters`)."""
    width, layers = tower.width, tower.layers
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    for block in tower.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
        nn.init.zeros_(block.attn.in_proj_bias)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.context_length = cfg.context_length
        self.visual = VisionTransformer(cfg.image_resolution, cfg.vision_patch_size,
                                        cfg.vision_width, cfg.vision_layers, cfg.vision_heads,
                                        cfg.embed_dim, cfg.quick_gelu)
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers,
                                       cfg.transformer_heads, cfg.quick_gelu)
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(
            torch.empty(cfg.context_length, cfg.transformer_width))
        self.ln_final = nn.LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    @torch.no_grad()
    def initialize_parameters(self):
        """OpenAI's initialisation, so that random-weight runs behave like an untrained CLIP."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower in (self.visual.transformer, self.transformer):
            init_transformer(tower)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] (CLIP-normalised) -> embeddings [B, embed_dim], not normalised."""
        return self.visual(image)

    def encode_text_pooled(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids [B, context_length] -> the end-of-text feature after ln_final, before
        text_projection [B, transformer_width] (Hugging Face's CLIPTextModel pooler_output; the
        text feature EchoCare-CLIP uses). Touches only the text tower's own parameters."""
        if text.shape[-1] > self.context_length:
            raise ValueError(f"text has {text.shape[-1]} tokens; this model takes at most "
                             f"{self.context_length}. Tokenize with context_length="
                             f"{self.context_length}.")
        L = text.shape[-1]
        x = self.token_embedding(text)
        x = x + self.positional_embedding[:L].to(x.dtype)
        x = self.ln_final(self.transformer(x, causal=True))  # [B, L, width]
        # Pool at the end-of-text token, which has the largest id in CLIP's vocabulary.
        return x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids [B, context_length] -> embeddings [B, embed_dim], not normalised."""
        return self.encode_text_pooled(text) @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        """Returns (logits_per_image [B_img, B_txt], logits_per_text), as OpenAI's CLIP does."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


def config_from_state_dict(sd: dict, quick_gelu: bool = True, vision_heads: int | None = None,
                           transformer_heads: int | None = None) -> CLIPConfig:
    """Infer every size of a ViT CLIP from OpenAI-named tensors.

    Head counts are not stored in the tensors. OpenAI's convention is one head per 64 channels;
    pass `vision_heads`/`transformer_heads` for other models (the tiny architecture uses 2).
    """
    missing = [k for k in ("visual.conv1.weight", "visual.positional_embedding",
                           "token_embedding.weight", "text_projection") if k not in sd]
    if missing:
        raise KeyError(f"not a CLIP ViT state dict with OpenAI key names: missing {missing}")
    vw, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    tw = sd["ln_final.weight"].shape[0]

    def depth(prefix):  # number of distinct N in "<prefix>N.*"
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1], image_resolution=patch * grid,
        vision_layers=depth("visual.transformer.resblocks."), vision_width=vw,
        vision_heads=vision_heads or max(1, vw // 64), vision_patch_size=patch,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=tw,
        transformer_heads=transformer_heads or max(1, tw // 64),
        transformer_layers=depth("transformer.resblocks."), quick_gelu=quick_gelu)


def build_model(state_dict: dict | None = None, config: CLIPConfig | str | None = None,
                quick_gelu: bool | None = None) -> CLIP:
    """Build a CLIP in fp32 from an OpenAI-named state dict (sizes inferred), or from a config.

    `config` may be a CLIPConfig or a name in ARCHS; with a state dict as well, the config wins
    (useful for head counts, which tensors do not reveal). Loading is `strict=True`: any missing
    or unexpected key is an error that lists the keys.
    """
    if isinstance(config, str):
        if config not in ARCHS:
            raise KeyError(f"unknown architecture {config!r}; choose from {sorted(ARCHS)}")
        config = ARCHS[config]
    if config is None and state_dict is None:
        raise ValueError("build_model needs a state_dict or a config")
    if config is None:
        config = config_from_state_dict(state_dict, quick_gelu=True)
    if quick_gelu is not None:
        config = replace(config, quick_gelu=quick_gelu)
    if state_dict is None:
        return CLIP(config).float().eval()
    with torch.device("meta"):  # every tensor comes from the state dict: no random init to pay
        model = CLIP(config)
    sd = {k: v for k, v in state_dict.items()
          if k not in ("input_resolution", "context_length", "vocab_size")}
    # own copies (the caller may build again from the same dict), adopted as the parameters
    model.load_state_dict({k: v.float().clone() for k, v in sd.items()}, strict=True, assign=True)
    return model.float().eval()


# ----------------------------------------------------------------------------- inference speed
def _scaled_linear(linear: nn.Linear, weight_scale: float, bias_scale: float) -> nn.Linear:
    """A new nn.Linear holding `linear`'s weights times the scales (no grad, same device/dtype)."""
    new = nn.Linear(linear.in_features, linear.out_features, device="meta")  # no init cost
    new.weight = nn.Parameter(linear.weight * weight_scale, requires_grad=False)
    new.bias = nn.Parameter(linear.bias * bias_scale, requires_grad=False)
    return new


def _foldable(mlp: nn.Module) -> bool:
    # Exactly nn.Linear: a LoRA layer on c_fc/c_proj adds its own delta, which folding would miss.
    return (isinstance(mlp, MLP) and isinstance(mlp.gelu, QuickGELU)
            and type(mlp.c_fc) is nn.Linear and type(mlp.c_proj) is nn.Linear)


@contextlib.contextmanager
def folded_quick_gelu(model: nn.Module):
    """Inference with QuickGELU's 1.702 folded into the weights, for every foldable MLP of `model`.

    x * sigmoid(1.702 x) = silu(1.702 x) / 1.702, so c_fc's weight and bias are scaled by 1.702,
    c_proj's weight by 1/1.702, and one fused SiLU pass replaces QuickGELU's three elementwise
    passes. Folding happens on copies of those two layers, swapped in for the block and swapped
    back on exit, so the model's own parameters (and state_dict) are never touched. Only under
    torch.no_grad() / inference_mode(): a training step must see OpenAI's parameters.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("folded_quick_gelu is for inference: use it inside torch.no_grad() or "
                           "torch.inference_mode()")
    swapped = [(m, m.c_fc, m.gelu, m.c_proj) for m in model.modules() if _foldable(m)]
    try:
        for mlp, c_fc, _, c_proj in swapped:
            mlp.c_fc = _scaled_linear(c_fc, QUICK_GELU_SCALE, QUICK_GELU_SCALE)
            mlp.gelu = nn.SiLU()
            mlp.c_proj = _scaled_linear(c_proj, 1 / QUICK_GELU_SCALE, 1.0)
        yield model
    finally:
        for mlp, c_fc, gelu, c_proj in swapped:
            mlp.c_fc, mlp.gelu, mlp.c_proj = c_fc, gelu, c_proj
