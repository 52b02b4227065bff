"""Caption throughput: template captions, fit_to_context, and LLM refinement through a local
fake OpenAI-compatible server with a fixed latency, at several concurrencies.

There is no peer library for these, so the references are the obvious alternatives:
- fit_to_context against cutting the last word until the caption fits (same word-level result
  on text without sentence or clause marks, many more tokenizer calls on long text);
- refinement at concurrency 8 and 32 against one request at a time (the server sleeps
  `--latency` seconds per request, standing in for a model's generation time).

    flock /tmp/clip_us_bench.lock python bench/bench_captions.py [--latency 0.1] [--n-refine 160]
"""
import argparse
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere

from clip_us.captions import llm
from clip_us.captions import templates as captions
from clip_us.captions.templates import fit_to_context, token_count

WORDS = ("irregular hypoechoic mass with spiculated margins and posterior acoustic shadowing "
         "taller than wide microcalcifications increased vascularity architectural distortion "
         "in the upper outer quadrant of the left breast").split()


def records(n: int) -> list:
    organs, labels = ("breast", "thyroid", "liver", "lymph node"), ("benign", "malignant", "normal")
    return [{"image": f"im{i}.png", "organ": organs[i % 4], "label": labels[i % 3],
             "age": str(30 + i % 50), "sex": "F", "shape": "oval", "margin": "circumscribed",
             "echogenicity": "hypoechoic", "posterior_features": "enhancement"} for i in range(n)]


def long_texts(n: int) -> list:
    """Captions of 80-300 words without sentence or clause marks (the word-level path)."""
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(80 + (i * 37) % 220))
            for i in range(n)]


def cut_last_word(text: str, context_length: int = 77) -> str:
    """The obvious reference: drop the last word until the caption fits."""
    words = text.split()
    while token_count(" ".join(words)) > context_length:
        words.pop()
    return " ".join(words)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_templates(n: int) -> None:
    recs = records(n)
    dt = timed(lambda: captions.add_captions(recs, [r["image"] for r in recs]))
    print(f"template captions: {n} records in {dt:.2f} s = {n / dt:,.0f} captions/s")


def bench_fit(n: int, rounds: int) -> None:
    texts = long_texts(n)
    assert [fit_to_context(t) for t in texts] == [cut_last_word(t) for t in texts]
    ours, ref = [], []
    for _ in range(rounds):   # interleaved, so load changes hit both alike
        ours.append(timed(lambda: [fit_to_context(t) for t in texts]))
        ref.append(timed(lambda: [cut_last_word(t) for t in texts]))
    a, b = sorted(ours)[rounds // 2], sorted(ref)[rounds // 2]
    print(f"fit_to_context: {n / a:,.0f} captions/s; cut-last-word reference {n / b:,.0f} "
          f"captions/s; speed-up {b / a:.1f}x (median of {rounds})")


def fake_server(latency: float):
    reply = json.dumps({"choices": [{"message": {"content": "An English caption."}}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(latency)
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128   # the default 5 drops SYNs of 32 parallel connects (1 s retry)

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/v1"


def bench_refine(n: int, latency: float, concurrencies) -> None:
    server, url = fake_server(latency)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "m.csv"
        src.write_text("image,caption\n" + "".join(f"im{i}.png,caption {i}\n" for i in range(n)))
        for c in concurrencies:
            out = Path(tmp) / f"out{c}.csv"
            rcfg = captions.RefineConfig(concurrency=c, progress=False)
            s = captions.refine_manifest(src, out, llm.ChatConfig(url, "m"), rcfg)
            rate = s["sent"] / s["seconds"]
            bound = f"; one at a time can do at most {1 / latency:.1f}" if latency else ""
            print(f"refine, {latency * 1000:.0f} ms/request, concurrency {c:2d}: "
                  f"{rate:7.1f} req/s{bound}")
    server.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-templates", type=int, default=15000)
    p.add_argument("--n-fit", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n-refine", type=int, default=160)
    p.add_argument("--latency", type=float, default=0.1)
    a = p.parse_args()
    bench_templates(a.n_templates)
    bench_fit(a.n_fit, a.rounds)
    bench_refine(a.n_refine, a.latency, (1, 8, 32))


if __name__ == "__main__":
    main()
