"""Baseline backbones' forward throughput on this CPU: clip_us against each one's peer library on
the same random weights, side by side in one process (fp32, batch 8, inference_mode).

    flock /tmp/clip_us_bench.lock python bench/bench_backbones.py [--repeats 3] [--batch 8]

Peers: open_clip's ViT-B-16-quickgelu (MetaCLIP, UniMedCLIP: the same architecture), open_clip's
TimmModel with timm's vit_base_patch16_224 trunk (BiomedCLIP), timm's vit_base_patch14_dinov2
(DINOv2; at --dinov2-res, 224 px by default to keep the run short, 518 px is the official size) and
torchvision's resnet18. Each peer's weights are saved in the authors' file layout and loaded through
clip_us.baselines.backbones.build, so the loader is exercised too. Both sides compute the pooled embedding
(ours: tower(x), the full forward). Runs alternate between the two and the median is reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import interleaved_medians  # noqa: E402
from clip_us.baselines import backbones  # noqa: E402


def _perturb(model):
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial norms, biases and gammas, as in trained weights
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _saved(folder, name, sd) -> str:
    path = os.path.join(folder, name)
    torch.save(sd, path)
    return path


def pairs(folder: str, dinov2_res: int):
    """name -> (ours, peer callable, input resolution), built one at a time."""
    import open_clip
    import timm
    from open_clip.timm_model import TimmModel
    from torchvision.models import resnet18
    oc = _perturb(open_clip.create_model("ViT-B-16-quickgelu", pretrained=None))
    path = _saved(folder, "b16_400m.pt", {"state_dict": oc.state_dict()})
    yield "metaclip", backbones.build("metaclip", path), oc.encode_image, 224
    del oc
    bio = _perturb(TimmModel("vit_base_patch16_224", embed_dim=512, image_size=224, pool="",
                             proj="linear", proj_bias=False))
    path = _saved(folder, "open_clip_pytorch_model.bin",
                  {f"visual.{k}": v for k, v in bio.state_dict().items()})
    yield "biomedclip", backbones.build("biomedclip", path), bio, 224
    del bio
    dino = _perturb(timm.create_model("vit_base_patch14_dinov2", pretrained=False,
                                      img_size=dinov2_res))
    path = _saved(folder, "dinov2_vitb14_pretrain.pth", dino.state_dict())
    yield "dinov2", backbones.build("dinov2", path), lambda x: dino.forward_features(x)[:, 0], \
        dinov2_res
    del dino
    rn = _perturb(resnet18(weights=None))
    ours = backbones.build("resnet18", _saved(folder, "mine.pth", rn.state_dict())).eval()
    rn.fc = ours.fc
    yield "resnet18", ours, rn, 224


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dinov2-res", type=int, default=224, help="518 is DINOv2's own size")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"fp32, CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    print(f"\n{'backbone':12s} {'px':>4s} {'clip_us img/s':>14s} {'peer img/s':>11s} "
          f"{'ratio':>6s}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name, ours, peer, res in pairs(folder, args.dinov2_res):
            x = torch.randn(args.batch, 3, res, res)
            with torch.inference_mode():  # same weights: the outputs must agree
                a, b = ours(x), peer(x)
            err = ((a - b).abs().max() / b.abs().max()).item()
            med = interleaved_medians({"ours": lambda: ours(x), "peer": lambda: peer(x)},
                                      args.repeats)
            t_ours, t_peer = med["ours"], med["peer"]
            print(f"{name:12s} {res:4d} {args.batch / t_ours:14.2f} {args.batch / t_peer:11.2f} "
                  f"{t_peer / t_ours:6.2f}x   (max rel. diff {err:.1e})", flush=True)
    print("\nratio = peer time / clip_us time (> 1: clip_us faster). unimedclip and clip are "
          "metaclip's architecture (QuickGELU ViT-B/16), so metaclip's row stands for them.")


if __name__ == "__main__":
    main()
