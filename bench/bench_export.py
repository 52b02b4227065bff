"""Benchmark: `python -m clip_us.export --to hf` and its two parts against their peers, one process.

clip_us writes Hugging Face folders without depending on the safetensors package, so we check
that its own pieces cost no more than the libraries they stand in for, on a ViT-B/16-shaped CLIP
with RANDOM weights (no download; the sizes, not the values, set the cost):

1. safetensors writing: clip_us.weights.write_safetensors vs safetensors.torch.save_file (a
   test-only peer), the same HF-keyed tensors and {"format": "pt"} metadata that export writes;
   the two files must be byte-identical. Median of interleaved repeats, MB/s of file.
2. key conversion OpenAI -> Hugging Face: clip_us.weights.openai_to_hf. transformers ships its
   convert_clip_original_pytorch_to_hf.py only in its source tree, not in the wheel; when it is
   not importable only ours is timed, and the table says so.
3. a whole `--to hf` export (clip_us.export.export) of a saved full fine-tune checkpoint over a
   saved base CLIP; its writing half alone (clip_us.export.save_hf: an in-memory model to a
   folder, key conversion included) next to transformers' CLIPModel.save_pretrained of the same
   weights, the peer that does the same job (transformers has no reader for our checkpoints).

    flock /tmp/clip_us_bench.lock python bench/bench_export.py
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import filecmp
import io
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import interleaved_medians  # noqa: E402
from clip_us import export as X  # noqa: E402
from clip_us.adapters import AdapterConfig, identity  # noqa: E402
from clip_us.fileio import save_checkpoint  # noqa: E402
from clip_us.model import build_model  # noqa: E402
from clip_us.weights import hf_config_for, openai_to_hf, write_safetensors  # noqa: E402

PEER_CONVERTER = "transformers.models.clip.convert_clip_original_pytorch_to_hf"


def random_clip(arch: str):
    """The architecture's CLIP with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return build_model(config=arch).eval()


def megabytes(tensors: dict) -> float:
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


def bench_write(tensors: dict, tmp: str, repeats: int) -> dict:
    """{name: median s} of writing `tensors` with each writer; asserts identical bytes."""
    from safetensors.torch import save_file
    ours, peer, meta = os.path.join(tmp, "ours.st"), os.path.join(tmp, "peer.st"), {"format": "pt"}
    times = interleaved_medians({
        "write_safetensors (ours)": lambda: write_safetensors(ours, tensors, meta),
        "safetensors.torch.save_file": lambda: save_file(tensors, peer, metadata=meta)}, repeats)
    assert filecmp.cmp(ours, peer, shallow=False), "safetensors files differ"
    os.remove(ours), os.remove(peer)
    return times


def peer_converter():
    """transformers' OpenAI -> HF conversion module, or None where it is not importable."""
    try:
        return __import__(PEER_CONVERTER, fromlist=["_"])
    except ImportError:
        return None


def save_checkpoints(model, tmp: str) -> str:
    """A base CLIP file and a full fine-tune checkpoint over it (as train_contrastive.py --train
    full records one); returns the checkpoint's path."""
    base, ckpt = os.path.join(tmp, "base.pt"), os.path.join(tmp, "best.pt")
    X.save_plain(model, base)
    tuned = {k: v + 1e-3 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(ckpt, {
        "what": identity("train_contrastive", "contrastive", "clip", "none", "full"),
        "config": {"weights": base, "arch": "ViT-B/16"}, "train_mode": "full",
        "adapter_config": dataclasses.asdict(AdapterConfig()), "adapter_state_dict": {},
        "model_state_dict": tuned})
    return ckpt


def hf_peer_save(model, out: str):
    """transformers' CLIPModel of the same weights, saved with save_pretrained (a closure)."""
    import transformers
    peer = transformers.CLIPModel(transformers.CLIPConfig.from_dict(hf_config_for(model.config)))
    peer.load_state_dict(openai_to_hf(X.plain_state_dict(model)))  # strict: the same tensors
    transformers.utils.logging.disable_progress_bar()
    return lambda: peer.save_pretrained(out)


def bench_whole(model, tmp: str, repeats: int) -> dict:
    """{name: median s} of the whole `--to hf` export, of its write half and of transformers'
    save_pretrained."""
    ckpt, ours_out = save_checkpoints(model, tmp), os.path.join(tmp, "hf-ours")
    quiet = contextlib.redirect_stdout(io.StringIO())  # build_clip prints the activation it chose
    with quiet:
        return interleaved_medians({
            "export(--to hf), whole (ours)": lambda: X.export(ckpt, "hf", ours_out),
            "save_hf, in-memory model (ours)": lambda: X.save_hf(model, os.path.join(tmp, "hf-mem")),
            "CLIPModel.save_pretrained (write only)": hf_peer_save(model, os.path.join(tmp, "hf-peer"))},
            repeats)


def row(name: str, seconds: float, mb: float) -> str:
    """A table row; MB/s of file for the rows that write one (not the key conversion)."""
    rate = f"{mb / seconds:9.0f}" if "openai_to_hf" not in name else f"{'-':>9}"
    return f"| {name:<40} | {seconds * 1e3:9.1f} | {rate} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ViT-B/16")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds per contender")
    ap.add_argument("--whole-repeats", type=int, default=2, help="rounds of the whole export")
    ap.add_argument("--tmp", default=None, help="folder for the files (default: the system's)")
    a = ap.parse_args()
    model = random_clip(a.arch)
    sd = X.plain_state_dict(model)
    hf, mb = openai_to_hf(sd), megabytes(sd)
    print(f"{a.arch}, random weights: {sum(t.numel() for t in sd.values()) / 1e6:.1f} M params, "
          f"{mb:.0f} MB fp32; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        write = bench_write(hf, tmp, a.repeats)
        convert = interleaved_medians({"openai_to_hf (ours)": lambda: openai_to_hf(sd)}, a.repeats)
        whole = bench_whole(model, tmp, a.whole_repeats)
    print(f"\n| {'what':<40} | {'ms':>9} | {'MB/s':>9} |\n|{'-' * 42}|{'-' * 11}|{'-' * 11}|")
    for name, s in {**write, **convert, **whole}.items():
        print(row(name, s, mb))
    if peer_converter() is None:
        print(f"\n{PEER_CONVERTER} is not importable (transformers ships it in its source tree "
              f"only): openai_to_hf is timed alone.")
    print("files byte-identical: yes (asserted)")


if __name__ == "__main__":
    main()
