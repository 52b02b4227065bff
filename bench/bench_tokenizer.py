"""Benchmark: clip_us.tokenizer against open_clip's SimpleTokenizer, same texts, same process.

Times (median of alternating runs) the vocab load, and tokenize() on 2,000 short ultrasound captions
(ASCII, our ftfy fast path) and 500 mixed Chinese/emoji/HTML-entity texts (both run ftfy), each
with a fresh tokenizer (cold cache) and again (warm cache). Checks the ids are identical first.

    flock /tmp/clip_us_bench.lock python bench/bench_tokenizer.py
"""
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from open_clip import tokenizer as peer_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_us import tokenizer as ours_module  # noqa: E402

ORGANS = ["breast", "thyroid", "lymph node", "liver"]
FINDINGS = ["oval", "irregular", "spiculated", "hypoechoic", "heterogeneous", "microcalcifications",
            "posterior shadowing", "posterior enhancement", "taller-than-wide", "smooth margins"]


def short_captions(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [f"An ultrasound image of the {rng.choice(ORGANS)} showing a {rng.choice(FINDINGS)}, "
            f"{rng.choice(FINDINGS)} lesion of {rng.uniform(0.3, 4):.1f} x "
            f"{rng.uniform(0.3, 3):.1f} cm; "
            f"BI-RADS {rng.randint(2, 5)}{rng.choice('abc')}." for _ in range(n)]


def unicode_texts(n: int, seed: int = 1) -> list:
    rng = random.Random(seed)
    parts = ["甲状腺结节", "乳腺超声", "😀", "👍🏽", "&amp;amp;", "&lt;b&gt;", "Straße", "ﬁle",
             "1.2×0.8厘米"]
    return [" ".join(rng.choice(parts) for _ in range(8)) for _ in range(n)]


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(label: str, ours_fn, peer_fn, repeats: int = 5) -> None:
    ours_s, peer_s = [], []
    for _ in range(repeats):  # alternate so shared-machine load hits both alike
        ours_s.append(median_time(ours_fn, 1))
        peer_s.append(median_time(peer_fn, 1))
    o, p = statistics.median(ours_s), statistics.median(peer_s)
    print(f"{label:<44} ours {o * 1e3:8.1f} ms   open_clip {p * 1e3:8.1f} ms   "
          f"speed-up x{p / o:5.1f}")


def main() -> None:
    torch.set_num_threads(1)
    for name, texts in [("2000 short captions", short_captions(2000)),
                        ("500 Chinese/emoji/HTML texts", unicode_texts(500))]:
        ours, peer = ours_module.SimpleTokenizer(), peer_module.SimpleTokenizer()
        assert torch.equal(ours(texts, truncate=True), peer(texts)), "ids differ from open_clip"
        # cold cache: fresh tokenizers, built outside the timed call
        fresh_ours = [ours_module.SimpleTokenizer() for _ in range(5)]
        fresh_peer = [peer_module.SimpleTokenizer() for _ in range(5)]
        compare(f"{name}, cold cache", lambda: fresh_ours.pop()(texts, truncate=True),
                lambda: fresh_peer.pop()(texts))
        compare(f"{name}, warm cache", lambda: ours(texts, truncate=True), lambda: peer(texts))
    compare("vocab load (SimpleTokenizer())", ours_module.SimpleTokenizer,
            peer_module.SimpleTokenizer)


if __name__ == "__main__":
    main()
