"""Benchmark: EchoCare-CLIP's two encoders and the WordPiece tokenizer against their peers, same
weights, same inputs, one process, alternating rounds so that shared-machine load hits both alike.

- Swin image encoder (clip_us.echocare.swin) vs MONAI's SwinTransformer(spatial_dims=2, use_v2=True), the
  EchoCare configuration at 256 px, forward under inference_mode: images/s. MONAI runs with its
  default (use_flash_attention=False), as the EchoCare-CLIP authors ran it.
- BERT-base (clip_us.echocare.bert) vs transformers.BertModel (its default attention), BioClinicalBERT's
  sizes, 128 tokens with padding: texts/s.
- WordPiece (clip_us.echocare.bert.WordPieceTokenizer) vs transformers' slow Python BertTokenizer
  (BertTokenizerLegacy in transformers 5; the fair peer) and, for reference, the Rust one:
  texts/s on 2,000 captions, cold (fresh tokenizer) and warm cache.

Outputs are checked equal before timing. The medians of the rounds are printed with the ratio.

    flock /tmp/clip_us_bench.lock python bench/bench_echocare_encoders.py [--threads 2]
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_us.echocare import bert as B  # noqa: E402
from clip_us.echocare import swin as S  # noqa: E402

ORGANS = ["breast", "thyroid", "liver", "lung", "carotid artery"]
FINDINGS = ["oval", "irregular", "spiculated", "hypoechoic", "heterogeneous", "microcalcifications",
            "posterior shadowing", "posterior enhancement", "taller-than-wide", "smooth margins",
            "anechoic", "isoechoic", "steatosis", "B-lines", "pleural effusion", "plaque"]


def captions(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [f"An ultrasound image of the {rng.choice(ORGANS)} showing a {rng.choice(FINDINGS)}, "
            f"{rng.choice(FINDINGS)} lesion of {rng.uniform(0.3, 4):.1f} x {rng.uniform(0.3, 3):.1f}"
            f" cm; BI-RADS {rng.randint(2, 5)}{rng.choice('abc')}. Patient aged "
            f"{rng.randint(20, 90)}, {rng.choice(['female', 'male'])}." for _ in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(label: str, unit_count: int, unit: str, ours, peer, rounds: int, peer_name: str):
    ours_s, peer_s = [], []
    for _ in range(rounds):  # alternate so that load from other jobs hits both alike
        ours_s.append(timed(ours))
        peer_s.append(timed(peer))
    o, p = statistics.median(ours_s), statistics.median(peer_s)
    print(f"{label:<46} ours {unit_count / o:9.2f} {unit}/s   {peer_name} {unit_count / p:9.2f} "
          f"{unit}/s   ratio x{p / o:5.2f}   (fastest rounds x{min(peer_s) / min(ours_s):5.2f})")


# ----------------------------------------------------------------------------- swin
def bench_swin(batch: int, rounds: int) -> None:
    from monai.networks.nets.swin_unetr import SwinTransformer
    cfg = S.SwinConfig()
    peer = SwinTransformer(in_chans=3, embed_dim=128, window_size=(8, 8), patch_size=(2, 2),
                           depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], mlp_ratio=4.0,
                           qkv_bias=True, spatial_dims=2, use_v2=True).eval()
    ours = S.SwinTransformer(cfg).eval()
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(batch, 3, 256, 256)
    with torch.inference_mode():
        for a, b in zip(ours(x), peer(x)):
            assert ((a - b).abs().max() / b.abs().max()) < 1e-4, "Swin outputs differ from MONAI"
        compare(f"Swin (EchoCare) 256 px, batch {batch}", batch, "img", lambda: ours(x),
                lambda: peer(x), rounds, "MONAI")


# ----------------------------------------------------------------------------- bert
def bench_bert(batch: int, rounds: int) -> None:
    import transformers
    cfg = transformers.BertConfig(vocab_size=28996)  # BioClinicalBERT's sizes (BERT-base, cased vocab)
    peer = transformers.BertModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        peer.save_pretrained(d)
        vocab = wordpiece_vocab(captions(500, seed=1))
        vocab += [f"w{i}" for i in range(28996 - len(vocab))]
        with open(os.path.join(d, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
        ours, tok = B.load_bert(d)
        rust = transformers.BertTokenizer(os.path.join(d, "vocab.txt"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 28996, (batch, 128), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):  # realistic captions: 30-128 tokens, the rest padding
        mask[i, int(torch.randint(30, 129, (1,), generator=g)):] = 0
    with torch.inference_mode():
        want = peer(input_ids=ids, attention_mask=mask).pooler_output
        assert torch.allclose(ours(ids, mask)[1], want, atol=1e-5), "BERT outputs differ"
        compare(f"BERT-base 128 tokens, batch {batch}", batch, "text", lambda: ours(ids, mask),
                lambda: peer(input_ids=ids, attention_mask=mask), rounds, "transformers")
        texts = captions(batch, seed=2)

        def ours_path():  # EchoCare-CLIP's text path: our tokenizer, all-padding columns cut
            i, m = tok(texts, 128)
            L = int(m.sum(1).max())
            return ours(i[:, :L], m[:, :L])[1]

        def peer_path():  # the authors' path: AutoTokenizer (Rust), padding="max_length"
            enc = rust(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
            return peer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        assert torch.allclose(ours_path(), peer_path(), atol=1e-5), "text paths differ"
        compare(f"captions -> pooled, batch {batch} (tokenizer+BERT)", batch, "text", ours_path,
                peer_path, rounds, "transformers")


# ----------------------------------------------------------------------------- wordpiece
def wordpiece_vocab(texts: list) -> list:
    """Whole words, their 3-letter prefixes with ## remainders split in two, and all characters."""
    words = sorted({w for t in texts for w in t.lower().replace(",", " ").split()})
    pieces = []
    for w in words:
        if len(w) > 6:
            pieces += [w[:3], "##" + w[3:6], "##" + w[6:]]
    chars = sorted({c for t in texts for c in t + t.lower() if not c.isspace()})
    return list(dict.fromkeys(list(B.SPECIALS) + words[::2] + pieces + chars + ["##" + c for c in chars]))


def bench_wordpiece(n: int, rounds: int) -> None:
    from transformers import BertTokenizer
    from transformers.models.bert import BertTokenizerLegacy
    texts = captions(n)
    with tempfile.TemporaryDirectory() as d:
        vf = os.path.join(d, "vocab.txt")
        with open(vf, "w") as f:
            f.write("\n".join(wordpiece_vocab(captions(500, seed=1))) + "\n")
        slow, rust = BertTokenizerLegacy(vf), BertTokenizer(vf)
        ours = B.WordPieceTokenizer.from_file(vf)
        fresh = [B.WordPieceTokenizer.from_file(vf) for _ in range(rounds)]

    def peer(tok):
        return tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")

    assert torch.equal(ours(texts, 128)[0], peer(slow)["input_ids"]), "ids differ (slow)"
    assert torch.equal(ours(texts, 128)[0], peer(rust)["input_ids"]), "ids differ (Rust)"
    compare(f"WordPiece {n} captions, cold cache", n, "text", lambda: fresh.pop()(texts, 128),
            lambda: peer(slow), rounds, "slow BertTokenizer")
    compare(f"WordPiece {n} captions, warm cache", n, "text", lambda: ours(texts, 128),
            lambda: peer(slow), rounds, "slow BertTokenizer")
    compare(f"WordPiece {n} captions, warm cache", n, "text", lambda: ours(texts, 128),
            lambda: peer(rust), rounds, "Rust BertTokenizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=["swin", "bert", "wordpiece"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    if args.only in (None, "wordpiece"):
        bench_wordpiece(2000, args.rounds)
    if args.only in (None, "bert"):
        bench_bert(8, args.rounds)
    if args.only in (None, "swin"):
        bench_swin(2, args.rounds)


if __name__ == "__main__":
    main()
