"""Forward throughput of the rows with heads of their own, on this CPU (fp32, inference_mode):

    flock /tmp/clip_us_bench.lock python bench/bench_heads.py [--repeats 3] [--skip dinov2]

- clipseg: our CLIPSeg (OpenAI-layout ViT-B/16 + rd64-refined decoder, loaded by load_clipseg from
  a random transformers CLIPSegForImageSegmentation saved with save_pretrained) against that
  transformers model, same weights, 224 px, batch 4, one prompt per image; logits checked equal.
- dinov2: the official segmentation row's forward at 518 px, batch 2: the frozen ViT-B/14's last
  5 normed blocks and the DINOv2SegHead. Ours: backbones.build("dinov2") on timm's random
  vit_base_patch14_dinov2 weights; peer: timm's get_intermediate_layers(n=5, norm=True) feeding
  the same head module. Logits checked equal.
- unet: the U-Net's own figures at 224 px, batch 8: forward (eval) and one training step.

Runs alternate between ours and the peer; the median of --repeats is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import clip_us  # noqa: E402
from bench.timing import interleaved_medians  # noqa: E402
from clip_us.baselines import backbones  # noqa: E402
from clip_us.baselines.clipseg import load_clipseg  # noqa: E402
from clip_us.baselines.dinov2_heads import DINOv2SegHead, last_blocks  # noqa: E402
from clip_us.baselines.unet import UNet  # noqa: E402


def _perturb(model):
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial norms, biases and gammas, as in trained weights
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def clipseg_pair(folder: str, batch: int):
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation
    cfg = CLIPSegConfig(vision_config={"patch_size": 16}, use_complex_transposed_convolution=True)
    peer = _perturb(CLIPSegForImageSegmentation(cfg))
    peer.save_pretrained(folder)
    ours = load_clipseg(folder)
    x = torch.randn(batch, 3, 224, 224)
    ids = clip_us.tokenize(["Benign: Oval shape, smooth margins. Malignant: Irregular shape."] * batch)
    return lambda: ours(x, ids), lambda: peer(input_ids=ids, pixel_values=x).logits


def dinov2_pair(folder: str, batch: int, res: int = 518):
    import timm
    peer = _perturb(timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=res))
    path = str(Path(folder) / "dinov2_vitb14_pretrain.pth")
    torch.save(peer.state_dict(), path)
    tower = backbones.build("dinov2", path)
    head = _perturb(DINOv2SegHead(768, 2))
    x, grid, blocks = torch.randn(batch, 3, res, res), (res // 14, res // 14), last_blocks(12, 5)

    def ours():
        return head(tower(x, return_blocks=blocks, pool=False, norm=True)[1], grid, (res, res))

    def theirs():  # the official code's path: DINOv2's (patch, cls) pairs
        pairs = peer.get_intermediate_layers(x, n=5, return_prefix_tokens=True, norm=True)
        return head([torch.cat([c, p], dim=1) for p, c in pairs], grid, (res, res))
    return ours, theirs


def unet_figures(batch: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model, x = UNet(3, 2), torch.randn(batch, 3, 224, 224)
    y = torch.randint(0, 2, (batch, 224, 224))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        opt.step()
    fwd, train = [], []
    for i in range(repeats + 1):  # the first round warms up
        with torch.inference_mode():
            t = time.perf_counter()
            model.eval()(x)
            fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        step()
        train.append(time.perf_counter() - t)
    return statistics.median(fwd[1:]), statistics.median(train[1:])


def check_equal(ours, peer, name: str):
    with torch.inference_mode():
        a, b = ours(), peer()
    err = (a - b).abs().max().item()
    print(f"{name}: max |ours - peer| = {err:.2e}", flush=True)
    if err > 1e-3 * max(1.0, b.abs().max().item()):
        raise SystemExit(f"{name}: outputs differ; not timing different computations")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["clipseg", "dinov2", "unet"])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name, build, batch in (("clipseg", clipseg_pair, 4), ("dinov2", dinov2_pair, 2)):
            if name in args.skip:
                continue
            ours, peer = build(folder, batch)
            check_equal(ours, peer, name)
            med = interleaved_medians({"ours": ours, "peer": peer}, args.repeats)
            t_ours, t_peer = med["ours"], med["peer"]
            print(f"{name}: ours {batch / t_ours:.2f} img/s, peer {batch / t_peer:.2f} img/s, "
                  f"ours / peer = {t_peer / t_ours:.2f}x", flush=True)
            del ours, peer
    if "unet" not in args.skip:
        fwd, train = unet_figures(8, args.repeats)
        print(f"unet: forward {8 / fwd:.1f} img/s, training step {8 / train:.1f} img/s "
              f"(batch 8, 224 px)")


if __name__ == "__main__":
    main()
