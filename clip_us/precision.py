"""The one meaning of `--precision fp32|bf16` for inference passes (zero-shot, evaluation, and the
validation and test passes of the training scripts), and the one autocast (training's --amp too).

- fp32: plain float32.
- bf16 on CUDA: autocast to bfloat16; the weights stay float32 (never a trained fp16 copy). A GPU
  without native bf16 (pre-Ampere: V100, T4) falls back to fp32 with a message.
- bf16 on a CPU with native bf16 (AVX512-BF16 or AMX on x86, Arm's BF16 extension): CPU autocast,
  with bf16 copies of the matrix weights made once per pass (`bf16_weights`), since CPU autocast
  would cast each frozen weight again at every call.
- bf16 on a CPU without it (e.g. AVX2 only): PyTorch emulates bf16 there, and a ViT-B/16 forward
  was measured 65-85x slower than fp32; so the request is refused with a message and fp32 is used.

`inference(model, precision, device)` is the context a script wraps its inference pass in:
torch.inference_mode(), QuickGELU folded into the weights (model.folded_quick_gelu: one SiLU pass
instead of three elementwise passes, on swapped-in copies, so the parameters are untouched), and the
autocast above.
"""
from __future__ import annotations

import contextlib
import platform

import torch
from torch import nn

from .model import folded_quick_gelu

PRECISIONS = ("fp32", "bf16")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # /proc/cpuinfo names (x86, x86, Arm)


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere, or when unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.lower().startswith(("flags", "features"))]
    except OSError:
        return set()
    return {flag for ln in lines for flag in ln.split(":", 1)[-1].split()}


def native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16, AMX, Arm BF16); Apple's Arm
    CPUs have no /proc/cpuinfo and report through platform instead."""
    if any(f in cpu_flags() for f in _BF16_FLAGS):
        return True
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def capability() -> str:
    """One line for logs and benchmarks: torch's CPU capability and whether bf16 is native."""
    return (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
            f"{'yes' if native_bf16() else 'no'}")


def _no_native_bf16(device: torch.device) -> str | None:
    """Why `device` has no native bf16 (a CPU without it; a pre-Ampere GPU, compute capability
    below 8.0: V100, T4), or None when it has."""
    if device.type == "cpu" and not native_bf16():
        return (f"this CPU ({capability()}) has no native bf16, where emulated bf16 runs "
                f"65-85x slower than fp32")
    if device.type == "cuda" and not torch.version.hip and \
            torch.cuda.get_device_capability(device)[0] < 8:
        return f"{torch.cuda.get_device_name(device)} has no native bf16"
    return None


def resolve_precision(precision: str, device, verbose: bool = True) -> str:
    """The precision that will actually run: bf16 falls back to fp32, with a message (unless
    `verbose` is False: e.g. on DDP ranks other than 0), where the device has no native bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    why = _no_native_bf16(torch.device(device)) if precision == "bf16" else None
    if why is None:
        return precision
    if verbose:
        print(f"clip_us: --precision bf16 ignored: {why}; using fp32")
    return "fp32"


def autocast(precision: str, device, cuda_only: bool = False):
    """bf16 autocast for an already resolved precision; a no-op context for fp32. The one autocast
    of the project: inference passes (--precision) and training steps (--amp, loop.train, with
    `cuda_only`: CPU autocast trains slower than fp32, so it is a no-op there)."""
    device = torch.device(device)
    if precision == "bf16" and (device.type == "cuda" or not cuda_only):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _autocast_weights(module: nn.Module) -> tuple[str, ...]:
    """The parameters of `module` that autocast casts to bf16 at each call: those of nn.Linear
    and nn.Conv2d (LoRA's layers included), and a packed attention's in_proj."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return ("weight", "bias")
    return ("in_proj_weight", "in_proj_bias")


@contextlib.contextmanager
def bf16_weights(model: nn.Module):
    """bf16 copies of the weights autocast would cast, swapped in for a pass and swapped back on
    exit: each is cast once per pass instead of at every call. The model's own parameters (and
    state_dict) are never touched; norms, embeddings and biases of other ops stay fp32."""
    swapped = [(m, name, p) for m in model.modules() for name in _autocast_weights(m)
               if (p := m._parameters.get(name)) is not None and p.dtype == torch.float32]
    try:
        for m, name, p in swapped:
            m._parameters[name] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
        yield model
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


@contextlib.contextmanager
def inference(model: nn.Module, precision: str = "fp32", device="cpu"):
    """inference_mode + folded QuickGELU + the resolved precision's autocast, around a pass; on
    a CPU in bf16 also the weights cast once (bf16_weights)."""
    resolved = resolve_precision(precision, device)
    cpu_bf16 = resolved == "bf16" and torch.device(device).type == "cpu"
    with torch.inference_mode(), folded_quick_gelu(model), \
            bf16_weights(model) if cpu_bf16 else contextlib.nullcontext(), \
            autocast(resolved, device):
        yield resolved
