"""Captions: every template of every tier (all fields, each field missing), tier sampling against
its weights, reproducibility across processes, fit_to_context (long clinical text, CJK, emoji),
the template/fit commands on data set layouts and metadata CSVs, the phantom's manifest, and LLM
refinement against a fake OpenAI-compatible server on 127.0.0.1: HTTP 500s, a timeout, malformed
JSON, an over-long reply, an empty reply, a killed run resumed, a rerun with no calls, N requests
in flight, describe mode's settings, the API key kept out of every output, a refused key, a
server that is not running (no retries)."""
import csv
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import regex
from conftest import exit_status
from PIL import Image

from clip_us import phantom
from clip_us.captions import __main__ as cli
from clip_us.captions import llm
from clip_us.captions import templates as captions
from clip_us.captions.templates import (
    FALLBACK,
    FIELDS,
    TEMPLATES,
    fit_to_context,
    record_fields,
    render,
    token_count,
)

REPO = Path(__file__).resolve().parents[1]
FULL = {"organ": "breast", "label": "malignant", "age": "52", "sex": "F",
        "region": "upper outer quadrant", "shape": "irregular", "margin": "spiculated",
        "echogenicity": "heterogeneous hypoechoic", "posterior_features": "acoustic shadowing",
        "calcifications": "microcalcifications", "size_mm": "14.2"}
# The record column that carries each field, and the text the field puts into a caption.
COLUMN = {"condition": "label", "posterior": "posterior_features"}
SHOWN = {"organ": "breast", "condition": "malignant", "age": "52-year-old", "sex": "woman",
         "region": "quadrant", "shape": "irregular", "margin": "spiculated",
         "echogenicity": "heterogeneous", "posterior": "shadowing"}


# ----------------------------------------------------------------------------- templates
def uses(template: str, slot: str) -> bool:
    return "{" + slot + "}" in template


def check_clean(caption: str):
    assert "{" not in caption and "}" not in caption and "None" not in caption, caption
    assert "  " not in caption and caption[0].isupper() and caption.endswith("."), caption
    assert token_count(caption) <= 77, caption


def test_ten_templates_per_tier_all_distinct():
    for tier, templates in TEMPLATES.items():
        assert len(templates) == 10 and len(set(templates)) == 10, tier
    assert all(uses(t, "organ") for t in TEMPLATES[1])
    assert all(uses(t, "organ") and uses(t, "condition") for t in TEMPLATES[2])
    for slot in ("patient", "region", "findings", "diagnosis"):
        assert all(uses(t, slot) for t in TEMPLATES[3]), slot


def test_every_template_renders_with_all_fields():
    fields = record_fields(FULL)
    assert set(FIELDS) <= set(fields)
    for tier, templates in TEMPLATES.items():
        for t in templates:
            c = render(t, fields)
            check_clean(c)
            assert "breast" in c.lower()
            if tier == 2:
                assert "malignant" in c
            if tier == 3:
                for text in ("52-year-old woman", "upper outer quadrant of the breast",
                             "irregular 14.2 mm lesion", "spiculated margins",
                             "heterogeneous hypoechoic echotexture",
                             "posterior acoustic shadowing", "microcalcifications",
                             "suspicious for malignancy"):
                    assert text in c, (text, c)


def test_every_caption_survives_the_training_length_filter():
    # train_contrastive.py, like the official code, drops captions of 20 characters or fewer
    for templates in TEMPLATES.values():
        for t in templates:
            assert len(render(t, {"organ": "eye", "condition": "normal"})) > 20, t


def expected_fallback(field: str, template: str) -> str | None:
    """The wording that must replace a missing field in this template (None: slot unused)."""
    if field == "organ":
        return "tissue" if uses(template, "organ") else None
    if field == "condition":
        return FALLBACK["condition"] if uses(template, "condition") else \
            (FALLBACK["diagnosis"] if uses(template, "diagnosis") else None)
    if not uses(template, "patient"):
        return None
    return {"age": "female patient", "sex": "52-year-old patient", "region": "the breast",
            "shape": "a 14.2 mm lesion", "margin": FALLBACK["margin"],
            "echogenicity": FALLBACK["echogenicity"], "posterior": FALLBACK["posterior"]}[field]


@pytest.mark.parametrize("field", FIELDS)
def test_every_template_renders_with_each_field_missing(field):
    rec = {k: v for k, v in FULL.items() if k != COLUMN.get(field, field)}
    fields = record_fields(rec)
    assert field not in fields
    for templates in TEMPLATES.values():
        for t in templates:
            c = render(t, fields)
            check_clean(c)
            assert SHOWN[field] not in c.lower(), (field, c)
            want = expected_fallback(field, t)
            assert want is None or want in c.lower(), (field, want, c)


def test_templates_render_with_nothing_but_fallbacks():
    for tier, templates in TEMPLATES.items():
        for t in templates:
            c = render(t, {})
            check_clean(c)
            if tier == 3:
                assert FALLBACK["patient"] in c.lower() and FALLBACK["findings"] in c
                assert FALLBACK["diagnosis"] in c and "the tissue" in c
    normal = render(TEMPLATES[3][0], record_fields({"organ": "liver", "label": "normal",
                                                    "age": "40"}))
    assert "no focal lesion" in normal and "with no abnormality" in normal


def test_patient_and_label_wording():
    assert captions.patient_phrase({"age": "18", "sex": "male"}) == "an 18-year-old man"
    assert captions.patient_phrase({"age": "8"}) == "an 8-year-old patient"
    assert captions.patient_phrase({"age": "61 years", "sex": "f"}) == "a 61-year-old woman"
    assert record_fields({"Label": "1"})["condition"] == "malignant"
    assert record_fields({"diagnosis": "Cyst", "margin": "N/A"}) == {"condition": "cyst"}


def draw_tiers(rec, n, weights):
    fields = record_fields(rec)
    rng = captions.row_rng(0, 0)
    return Counter(captions.usable_tier(rng.choices((1, 2, 3), weights=weights)[0], fields)
                   for _ in range(n))


def test_tier_sampling_matches_weights():
    n = 40000
    for spec in ("20,30,50", "60,0,40", (1, 1, 1)):
        w = captions.parse_tier_weights(spec)
        counts = draw_tiers(FULL, n, w)
        for tier in (1, 2, 3):   # 4 standard deviations of a proportion at n = 40000 < 0.01
            assert abs(counts[tier] / n - w[tier - 1]) < 0.01, (spec, counts)
    # template_caption itself draws with those weights (fewer draws: it renders too)
    rng = captions.row_rng(1, 2)
    tiers = Counter(captions.template_caption(FULL, rng)[1] for _ in range(3000))
    for tier, w in zip((1, 2, 3), captions.TIER_WEIGHTS):
        assert abs(tiers[tier] / 3000 - w) < 0.04, tiers


def test_tiers_fall_back_when_fields_are_missing():
    label_only = draw_tiers({"organ": "breast", "label": "benign"}, 5000, (0.2, 0.3, 0.5))
    assert set(label_only) == {1, 2} and abs(label_only[2] / 5000 - 0.8) < 0.03
    assert set(draw_tiers({"organ": "breast"}, 500, (0.2, 0.3, 0.5))) == {1}
    with pytest.raises(captions.CaptionError, match="three non-negative"):
        captions.parse_tier_weights("50,50")


def test_choices_are_seeded_and_survive_a_new_process():
    rows = [dict(FULL, image=f"img{i}.png") for i in range(30)]
    ours = [captions.template_caption(r, captions.row_rng(7, i, r["image"])) for i, r in
            enumerate(rows)]
    again = [captions.template_caption(r, captions.row_rng(7, i, r["image"])) for i, r in
             enumerate(rows)]
    other = [captions.template_caption(r, captions.row_rng(8, i, r["image"])) for i, r in
             enumerate(rows)]
    assert ours == again and ours != other
    code = ("import json,sys; from clip_us.captions import templates as c; rows=json.loads(sys.argv[1]);"
            "print(json.dumps([c.template_caption(r, c.row_rng(7, i, r['image'])) "
            "for i, r in enumerate(rows)]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")   # a different salt for hash()
    out = subprocess.run([sys.executable, "-c", code, json.dumps(rows)], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert [tuple(x) for x in json.loads(out)] == ours


# ----------------------------------------------------------------------------- fit_to_context
CLINICAL = ("Ultrasound of the left breast at 2 o'clock demonstrates an irregular, taller-than-"
            "wide hypoechoic mass measuring 14 x 11 x 9 mm with spiculated margins and posterior "
            "acoustic shadowing. Internal microcalcifications are present; vascularity is "
            "increased on colour Doppler. The axillary lymph nodes show cortical thickening up to "
            "4 mm without a fatty hilum. Findings are highly suggestive of malignancy, BI-RADS 5. "
            "Ultrasound-guided core needle biopsy is recommended.")
ONE_SENTENCE = ("Irregular hypoechoic mass in the upper outer quadrant of the left breast, "
                "measuring fourteen by eleven millimetres, with spiculated and angular margins, "
                "a taller-than-wide orientation, heterogeneous internal echoes, punctate "
                "microcalcifications, posterior acoustic shadowing, increased peripheral "
                "vascularity and an echogenic halo, with adjacent architectural distortion and "
                "skin thickening.")
NO_PUNCT = " ".join(["hypoechoic"] * 30 + ["microlobulated"] * 30)
CJK = ("左乳外上象限可见一低回声结节，大小约14×11毫米，形态不规则，边缘呈毛刺状，"
       "纵横比大于1，内部回声不均匀，可见多发微钙化，后方回声衰减。"
       "彩色多普勒显示周边血流信号丰富。同侧腋窝可见肿大淋巴结，皮质增厚，淋巴门结构消失。"
       "超声诊断：左乳实性结节，BI-RADS 5类，建议穿刺活检。")
JAPANESE = "乳腺の外上部に不整形の低エコー腫瘤を認めます" * 6
EMOJI = "Scan done 👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 " * 12 + "👨‍👩‍👧‍👦" * 40


def graphemes(text):
    return regex.findall(r"\X", text)


def assert_whole_words(original: str, fitted: str):
    """`fitted` is a prefix of `original` made of whole grapheme clusters, ending at a space,
    a punctuation mark, or a character of a script written without spaces."""
    assert original.startswith(fitted) and fitted.strip()
    g, h = graphemes(fitted), graphemes(original)
    assert h[:len(g)] == g, "a grapheme cluster (emoji, combining mark) was split"
    rest = original[len(fitted):]
    if rest:
        nxt, last = rest[0], g[-1]
        assert (nxt.isspace() or regex.match(r"\p{P}", nxt) or captions.STANDALONE.match(last)
                or captions.STANDALONE.match(graphemes(rest)[0])), (fitted[-20:], rest[:20])


@pytest.mark.parametrize("text", [CLINICAL, ONE_SENTENCE, NO_PUNCT, CJK, JAPANESE, EMOJI],
                         ids=["clinical", "one-sentence", "no-punctuation", "cjk", "japanese",
                              "emoji"])
def test_fit_to_context_fits_and_keeps_words(text):
    assert token_count(text) > 77
    fitted = fit_to_context(text, 77)
    assert token_count(fitted) <= 77
    assert_whole_words(text, fitted)
    captions.default_tokenizer()(fitted, 77)          # no truncation needed
    assert token_count(fit_to_context(text, 20)) <= 20


def test_fit_to_context_cut_order():
    # sentence boundary first: the two whole first sentences fit (69 tokens), the third not
    fitted = fit_to_context(CLINICAL)
    assert fitted.endswith("Doppler.") and fitted.count(".") == 2
    # one long sentence: cut at a clause boundary, trailing comma dropped
    clause = fit_to_context(ONE_SENTENCE)
    assert ONE_SENTENCE[len(clause)] == "," and not clause.endswith(",")
    # no punctuation at all: whole words, as many as fit
    words = fit_to_context(NO_PUNCT)
    assert token_count(words + " microlobulated") > 77 and words.split() == NO_PUNCT.split()[
        :len(words.split())]
    # CJK: its first sentence is too long, so the cut is at a clause mark (，); short
    # sentences are kept whole up to a full stop (。)
    assert CJK[len(fit_to_context(CJK))] == "，"
    assert fit_to_context("左乳低回声结节，边缘不规则。" * 12).endswith("不规则。")


def test_fit_to_context_leaves_fitting_captions_alone():
    for text in ("  An ultrasound image of the breast.  ", "乳腺超声。", "ok 👍🏽", "",
                 " ".join(["word"] * 75)):
        assert fit_to_context(text) is text
    with pytest.raises(captions.CaptionError, match="context length must be at least 3"):
        fit_to_context("x", 2)


# ----------------------------------------------------------------------------- template command
def png(path: Path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def make_busi(root: Path):
    for cls, n in (("benign", 3), ("malignant", 2), ("normal", 2)):
        for i in range(1, n + 1):
            png(root / cls / f"{cls} ({i}).png")
            png(root / cls / f"{cls} ({i})_mask.png", 255)


def test_template_command_on_busi(tmp_path, capsys):
    make_busi(tmp_path / "BUSI")
    out = tmp_path / "manifests" / "busi.csv"
    cli.main(["template", str(tmp_path / "BUSI"), "--out", str(out), "--seed", "3"])
    assert "wrote 7 captions" in capsys.readouterr().out
    rows = read_csv(out)
    assert [r["label"] for r in rows] == ["benign"] * 3 + ["malignant"] * 2 + ["normal"] * 2
    assert {r["organ"] for r in rows} == {"breast"} and {r["dataset"] for r in rows} == {"BUSI"}
    assert list(rows[0])[:6] == ["image", "caption", "organ", "label", "dataset", "tier"]
    for r in rows:   # images are relative to the manifest, masks are not rows
        assert (out.parent / r["image"]).is_file() and "_mask" not in r["image"]
        assert r["tier"] in ("1", "2") and "breast" in r["caption"].lower()
    again = tmp_path / "again.csv"
    captions.template_manifest(tmp_path / "BUSI", again, seed=3)
    assert [r["caption"] for r in read_csv(again)] == [r["caption"] for r in rows]


def test_template_command_on_folder_layout_and_errors(tmp_path, capsys):
    root = tmp_path / "scans"
    for i in range(4):
        png(root / "images" / f"case{i}.png")
    (root / "labels.csv").write_text("image,label\ncase0.png,benign\ncase1.png,malignant\n"
                                     "case2.png,benign\ncase3.png,1\n")
    out = root / "captions.csv"
    assert exit_status(lambda: cli.main(["template", str(root), "--out", str(out)])) == 2
    assert "--organ" in capsys.readouterr().err     # "scans" names no organ
    cli.main(["template", str(root), "--out", str(out), "--organ", "thyroid",
                   "--tier-weights", "0,100,0"])
    rows = read_csv(out)
    assert [r["image"] for r in rows] == [f"images/case{i}.png" for i in range(4)]
    assert [r["label"] for r in rows] == ["benign", "malignant", "benign", "malignant"]
    assert all(r["tier"] == "2" and "thyroid" in r["caption"].lower() for r in rows)
    assert exit_status(lambda: cli.main(["template", str(tmp_path / "nothing"), "--out", str(out)])) == 2


def test_template_command_on_nextgen_layout_and_unlabelled_folder(tmp_path, capsys):
    root = tmp_path / "release"
    for name in ("a.png", "b.png", "c.png"):
        png(root / "all" / "images" / name)
    (root / "classification" / "BUSI").mkdir(parents=True)
    (root / "classification" / "BUSI" / "labels.csv").write_text(
        "image,label\na.png,benign\nb.png,malignant\nc.png,normal\n")
    out = root / "captions.csv"
    cli.main(["template", str(root), "--out", str(out), "--nextgen-name", "BUSI",
                   "--dataset-name", "BUSI"])
    rows = read_csv(out)
    assert [(r["image"], r["label"], r["organ"]) for r in rows] == [
        ("all/images/a.png", "benign", "breast"), ("all/images/b.png", "malignant", "breast"),
        ("all/images/c.png", "normal", "breast")]
    (root / "all" / "images").rename(root / "images")
    assert exit_status(lambda: cli.main(["template", str(root), "--out", str(out), "--organ", "liver"])) == 2
    assert "no labels.csv" in capsys.readouterr().err


def test_template_command_on_metadata_csv(tmp_path):
    src = tmp_path / "raw" / "meta.csv"
    png(tmp_path / "raw" / "img" / "a.png")
    png(tmp_path / "raw" / "img" / "b.png")
    src.write_text("file_name,organ,label,age,sex,shape,margin,note\n"
                   "img/a.png,thyroid,malignant,61,F,irregular,ill-defined,x1\n"
                   "img/b.png,liver,,,,,,x2\n")
    out = tmp_path / "out" / "captions.jsonl"
    s = captions.template_manifest(src, out, tier_weights="0,0,1")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert s["tiers"] == {1: 1, 2: 0, 3: 1}          # b.png has only its organ: tier 1
    assert rows[0]["image"] == "../raw/img/a.png" and (out.parent / rows[0]["image"]).is_file()
    assert "61-year-old woman" in rows[0]["caption"] and rows[0]["note"] == "x1"
    assert FALLBACK["echogenicity"] in rows[0]["caption"]
    assert rows[1]["caption"] in [render(t, {"organ": "liver"}) for t in TEMPLATES[1]]
    # --image-col picks the column, --context-length the token budget, --seed the draws
    src.write_text("scan,picture,organ,label,age,shape\nx,img/a.png,thyroid,benign,40,oval\n")
    short = tmp_path / "short.csv"
    cli.main(["template", str(src), "--out", str(short), "--image-col", "picture",
                   "--context-length", "12", "--tier-weights", "0,0,1"])
    row = read_csv(short)[0]
    assert row["image"] == "raw/img/a.png" and row["scan"] == "x" and row["tier"] == "3"
    full = [render(t, record_fields(row)) for t in TEMPLATES[3]]
    assert token_count(row["caption"]) <= 12 and any(f.startswith(row["caption"]) for f in full)
    # --organ is every row's organ, over an organ column
    cli.main(["template", str(src), "--out", str(short), "--image-col", "picture",
                   "--organ", "breast"])
    assert read_csv(short)[0]["organ"] == "breast" and "breast" in read_csv(short)[0]["caption"]
    with pytest.raises(captions.CaptionError, match="does not use --dataset, --skip-bad"):
        captions.template_manifest(src, out, dataset="busi", skip_bad=True)
    with pytest.raises(captions.CaptionError, match="does not use --image-col"):
        captions.template_manifest(tmp_path / "raw", out, image_col="x")
    with pytest.raises(captions.CaptionError, match="--organ"):
        src.write_text("image,label\nimg/a.png,benign\n")
        captions.template_manifest(src, out)


def test_fit_command_counts_changes(tmp_path, capsys):
    src = tmp_path / "m.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["Caption", "filename"], [CLINICAL, "a.png"], ["Short caption.", "b.png"]])
    cli.main(["fit", str(src), "--out", str(tmp_path / "o.csv")])
    assert "1 changed" in capsys.readouterr().out
    rows = read_csv(tmp_path / "o.csv")
    assert rows[0]["Caption"] == fit_to_context(CLINICAL)
    assert rows[0]["original_caption"] == CLINICAL
    assert rows[1]["Caption"] == "Short caption." and rows[1]["filename"] == "b.png"
    # written elsewhere, the image paths still name the same files (relative to the manifest)
    cli.main(["fit", str(src), "--out", str(tmp_path / "sub" / "o.csv")])
    assert read_csv(tmp_path / "sub" / "o.csv")[1]["filename"] == "../b.png"
    # a .json name is JSONL both ways (as train_contrastive's reader takes it), not CSV
    cli.main(["fit", str(src), "--out", str(tmp_path / "o.json")])
    cli.main(["fit", str(tmp_path / "o.json"), "--out", str(tmp_path / "again.csv")])
    assert read_csv(tmp_path / "again.csv")[1]["Caption"] == "Short caption."


def test_phantom_caption_manifest(tmp_path):
    cfg = phantom.PhantomConfig(n=16, size=64, organs=phantom.ORGANS, p_normal=0.2)
    path = captions.phantom_manifest(tmp_path / "ph", cfg, caption_seed=1)
    rows = read_csv(path)
    meta = [json.loads(x) for x in (tmp_path / "ph" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {r["dataset"] for r in rows} == {"phantom"}
    by_file = {m["file"]: m for m in meta}
    for r in rows:
        m = by_file[r["image"]]
        assert (path.parent / r["image"]).is_file()
        assert r["organ"] == m["organ"] and r["label"] == m["label_name"]
        if r["tier"] == "3" and r["label"] != "normal":
            assert m["attributes"]["margin"] in r["caption"]
    mtime = path.stat().st_mtime_ns
    assert captions.phantom_manifest(tmp_path / "ph", cfg, caption_seed=1) == path
    assert path.stat().st_mtime_ns == mtime           # reused, not rewritten


# ----------------------------------------------------------------------------- fake LLM server
def chat_reply(text) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


class FakeLLM:
    """A threaded OpenAI-compatible server on 127.0.0.1. `behave(caption, attempt, body)`
    returns (status, body bytes, seconds to wait first[, extra headers])."""

    def __init__(self, behave):
        self.behave, self.lock = behave, threading.Lock()
        self.requests, self.attempts, self.headers = [], Counter(), []
        self.in_flight = self.max_in_flight = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                with fake.lock:
                    attempt = fake.attempts[text]
                    fake.attempts[text] += 1
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    status, payload, wait, *headers = fake.behave(text, attempt, body)
                    time.sleep(wait)
                finally:
                    # out of flight before the reply leaves: the client's next request can
                    # then never be counted beside this one
                    with fake.lock:
                        fake.in_flight -= 1
                try:
                    self.send_response(status)
                    for name, value in (headers[0] if headers else {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass                                  # the client timed out and left

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64     # the default 5 can drop parallel connects (1 s retry)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def serve(no_proxy):
    servers = []

    def start(behave):
        servers.append(FakeLLM(behave))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


LONG_REPLY = " ".join(["The lesion is irregular and hypoechoic with spiculated margins."] * 12)


def robust_behaviour(text, attempt, body):
    ok = (200, chat_reply(f"EN: {text}"), 0)
    if text.startswith("five-hundred") and attempt < 2:
        return 500, b'{"error": "overloaded"}', 0
    if text.startswith("slow") and attempt == 0:
        return 200, chat_reply("too late"), 3.0          # the client gives up at 1.5 s
    if text.startswith("garbled") and attempt == 0:
        return 200, b'{"choices": [{"message": ', 0
    if text.startswith("wordy"):
        return 200, chat_reply(LONG_REPLY), 0
    if text.startswith("silent"):
        return 200, chat_reply("   "), 0
    if text.startswith("broken"):
        return 503, b"down", 0
    if text.startswith("rejected"):
        return 400, b'{"error": "prompt too long"}', 0
    return ok


def write_manifest(path: Path, caps):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "organ"])
        w.writerows([[f"im{i}.png", c, "breast"] for i, c in enumerate(caps)])


def refine(src, out, url, retries=2, **kw):
    # 1.5 s: far above a reply's time on a busy machine, so only "slow" rows time out
    chat = llm.ChatConfig(url, "fake-model", timeout=1.5, retries=retries, backoff=0.01)
    return captions.refine_manifest(src, out, chat, captions.RefineConfig(progress=False, **kw))


def test_refine_retries_fits_and_reports_failures(tmp_path, serve):
    server = serve(robust_behaviour)
    caps = ["plain one", "five-hundred twice", "slow first", "garbled json", "wordy reply",
            "silent reply", "broken server", "plain two", "plain one", "rejected prompt"]
    write_manifest(tmp_path / "m.csv", caps)
    s = refine(tmp_path / "m.csv", tmp_path / "out.csv", server.url)
    rows = read_csv(tmp_path / "out.csv")
    assert [r["image"] for r in rows] == [f"im{i}.png" for i in range(10)]     # order kept
    assert [r["original_caption"] for r in rows] == caps
    status = [r["refine_status"] for r in rows]
    assert status == ["ok", "ok", "ok", "ok", "fitted", "failed", "failed", "ok", "ok", "failed"]
    for i in (0, 1, 2, 3, 7, 8):
        assert rows[i]["caption"] == f"EN: {caps[i]}"
    assert token_count(rows[4]["caption"]) <= 77 and LONG_REPLY.startswith(rows[4]["caption"])
    assert rows[5]["caption"] == "silent reply" and rows[6]["caption"] == "broken server"
    assert server.attempts["five-hundred twice"] == 3 and server.attempts["slow first"] == 2
    assert server.attempts["garbled json"] == 2
    assert server.attempts["silent reply"] == 3 and server.attempts["broken server"] == 3
    assert server.attempts["plain one"] == 1              # duplicate captions: one request
    assert server.attempts["rejected prompt"] == 1        # a 400 is not worth a retry
    assert s["failed_rows"] == [5, 6, 9] and s["failed"] == 3 and s["fitted"] == 1
    assert "empty reply" in s["errors"][5] and "HTTP 503" in s["errors"][6]
    assert "HTTP 400" in s["errors"][9] and "prompt too long" in s["errors"][9]
    assert s["requests"] == 9 and s["sent"] == 9 and s["retries"] == 2 + 1 + 1 + 2 + 2
    # a rerun asks again only for the failures; everything else comes from the cache
    before = len(server.requests)
    s2 = refine(tmp_path / "m.csv", tmp_path / "out.csv", server.url)
    assert s2["cached"] == 6 and s2["sent"] == 3
    assert len(server.requests) - before == 2 * 3 + 1


def test_retry_after_is_honoured(tmp_path, serve):
    server = serve(lambda text, attempt, body: (429, b"slow down", 0, {"Retry-After": "0.6"})
                   if attempt == 0 else (200, chat_reply("fine"), 0))
    chat = llm.ChatConfig(server.url, "m", timeout=1.5, retries=1, backoff=0.01)
    t0 = time.perf_counter()
    assert llm.complete(chat, llm.request_body("m", [{"role": "user", "content": "x"}])) == "fine"
    assert time.perf_counter() - t0 >= 0.6 and server.attempts["x"] == 2


def test_rerun_makes_no_calls_and_writes_the_same_file(tmp_path, serve):
    server = serve(lambda text, attempt, body: (200, chat_reply(text.upper()), 0))
    write_manifest(tmp_path / "m.csv", [f"caption {i}" for i in range(12)])
    refine(tmp_path / "m.csv", tmp_path / "out.csv", server.url)
    first, n = (tmp_path / "out.csv").read_bytes(), len(server.requests)
    assert n == 12
    s = refine(tmp_path / "m.csv", tmp_path / "out.csv", server.url)
    assert len(server.requests) == n and s["sent"] == 0 and s["cached"] == 12
    assert (tmp_path / "out.csv").read_bytes() == first
    server.close()                                     # nothing to ask: no server needed
    refine(tmp_path / "m.csv", tmp_path / "out2.csv", server.url,
           cache=str(tmp_path / "out.csv.cache.jsonl"))
    assert (tmp_path / "out2.csv").read_bytes() == first


def test_requests_in_flight_at_once(tmp_path, serve):
    arrived = threading.Condition()

    def behave(text, attempt, body):
        # hold each request until 8 are in flight; at most 1 s, below the client's timeout, so
        # a client that sends fewer at a time fails instead of hanging
        with arrived:
            arrived.notify_all()
            arrived.wait_for(lambda: server.in_flight >= 8, timeout=1)
        return 200, chat_reply("done"), 0

    server = serve(behave)
    write_manifest(tmp_path / "m.csv", [f"caption {i}" for i in range(16)])
    s = refine(tmp_path / "m.csv", tmp_path / "out.csv", server.url, concurrency=8)
    assert server.max_in_flight == 8 and s["ok"] == 16


def test_killed_run_resumes_without_repeating_calls(tmp_path, serve):
    release, answered = threading.Event(), []

    def behave(text, attempt, body):
        with server.lock:
            first = len(answered) < 4
            if first:
                answered.append(text)
        if not first:
            release.wait(20)                         # hold every later request
        return 200, chat_reply(f"EN: {text}"), 0

    server = serve(behave)
    caps = [f"caption {i}" for i in range(10)]
    write_manifest(tmp_path / "m.csv", caps)
    out, cache = tmp_path / "out.csv", tmp_path / "out.csv.cache.jsonl"
    cmd = [sys.executable, "-m", "clip_us.captions", "refine", str(tmp_path / "m.csv"),
           "--out", str(out), "--endpoint", server.url, "--model", "fake-model",
           "--concurrency", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and (not cache.exists() or cache.read_text().count("\n") < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    release.set()
    assert not out.exists() and cache.read_text().count("\n") == 4
    with open(cache, "a") as f:
        f.write('{"key": "0f3a')                        # a line the kill cut short
    before = len(server.requests)
    s = refine(tmp_path / "m.csv", out, server.url)
    resent = [b["messages"][-1]["content"] for b in server.requests[before:]]
    assert s["cached"] == 4 and s["sent"] == 6 and len(resent) == 6
    assert s["torn_cache_lines"] == 1
    assert not set(resent) & set(answered)             # no answered request asked again
    assert [r["caption"] for r in read_csv(out)] == [f"EN: {c}" for c in caps]
    # the new answers started on a fresh line, so all 10 are read back: no calls at all
    s = refine(tmp_path / "m.csv", out, server.url)
    assert s["cached"] == 10 and s["sent"] == 0 and s["torn_cache_lines"] == 1


def test_describe_mode_settings_and_seeded_pick(tmp_path, serve):
    three = "1. First caption of the lesion.\n2) **Second caption.**\n3. \"Third caption.\""
    server = serve(lambda text, attempt, body: (200, chat_reply(f"<think>hm</think>{three}"), 0))
    src = tmp_path / "m.csv"
    src.write_text("image,caption,organ,label,margin,split\n" +
                   "".join(f"im{i}.png,old {i},breast,benign,circumscribed,train\n"
                           for i in range(20)))
    refine(src, tmp_path / "a.csv", server.url, mode="describe", seed=1)
    body = server.requests[0]
    assert body["temperature"] == 1.0 and body["top_p"] == 0.95
    assert body["repetition_penalty"] == 1.05 and body["max_tokens"] == 320
    assert body["model"] == "fake-model" and len(server.requests) == 1   # 20 identical rows
    user = body["messages"][-1]["content"]
    assert "organ: breast" in user and "margin: circumscribed" in user
    assert "old 0" not in user and "train" not in user and "im0" not in user
    picks = [r["caption"] for r in read_csv(tmp_path / "a.csv")]
    assert set(picks) <= {"First caption of the lesion.", "Second caption.", "Third caption."}
    assert len(set(picks)) == 3                          # the pick varies by row
    refine(src, tmp_path / "b.csv", server.url, mode="describe", seed=1)
    refine(src, tmp_path / "c.csv", server.url, mode="describe", seed=2)
    assert [r["caption"] for r in read_csv(tmp_path / "b.csv")] == picks
    refine(src, tmp_path / "out" / "b.csv", server.url, mode="describe", seed=1)
    assert read_csv(tmp_path / "out" / "b.csv")[0]["image"] == "../im0.png"   # same file
    assert [r["caption"] for r in read_csv(tmp_path / "c.csv")] != picks
    translate = captions.RefineConfig().params
    assert translate["repetition_penalty"] is None          # not sent unless asked
    no_meta = tmp_path / "n.csv"
    write_manifest(no_meta, ["x"])
    no_meta.write_text("image,caption\nim.png,x\n")
    with pytest.raises(captions.CaptionError, match="metadata"):
        refine(no_meta, tmp_path / "d.csv", server.url, mode="describe")


def test_describe_reply_without_three_numbered_lines_is_retried(tmp_path, serve):
    replies = ["Sure! Here you go.", "1. Fine.\n2. Also fine.",
               "1. Fine.\n2. Fine.\n3. Fine.\n4. x"]
    server = serve(lambda text, attempt, body: (200, chat_reply(replies[attempt]), 0))
    (tmp_path / "m.csv").write_text("image,caption,organ\na.png,x,liver\n")
    s = refine(tmp_path / "m.csv", tmp_path / "o.csv", server.url, mode="describe")
    assert read_csv(tmp_path / "o.csv")[0]["caption"] == "Fine." and len(server.requests) == 3
    assert s["retries"] == 2


def test_api_key_sent_but_never_written(tmp_path, serve, monkeypatch, capsys):
    secret = "sk-test-SECRET-1234"
    monkeypatch.setenv("MY_LLM_KEY", secret)
    server = serve(lambda text, attempt, body: (200, chat_reply("fine caption"), 0))
    write_manifest(tmp_path / "m.csv", ["a", "b"])
    out = tmp_path / "o.csv"
    cli.main(["refine", str(tmp_path / "m.csv"), "--out", str(out), "--endpoint",
                   server.url + "/", "--model", "m", "--api-key-env", "MY_LLM_KEY"])
    assert {h.get("Authorization") for h in server.headers} == {f"Bearer {secret}"}
    printed = capsys.readouterr()
    assert "MY_LLM_KEY" in printed.out and secret not in printed.out + printed.err
    for f in tmp_path.iterdir():
        assert secret not in f.read_text()
    assert repr(llm.ChatConfig("http://h/v1", "m", api_key=secret)).find(secret) == -1


def test_refused_key_stops_the_run(tmp_path, serve, capsys):
    server = serve(lambda text, attempt, body: (401, b'{"error": "bad key"}', 0))
    write_manifest(tmp_path / "m.csv", [f"c{i}" for i in range(30)])
    assert exit_status(lambda: cli.main(["refine", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o.csv"),
                                         "--endpoint", server.url, "--model", "m", "--concurrency", "1",
                                         "--no-progress"])) == 2
    assert "API key" in capsys.readouterr().err
    assert len(server.requests) < 5 and not (tmp_path / "o.csv").exists()


def test_refine_flags_reach_the_request_and_the_row_choice(tmp_path, serve):
    server = serve(lambda text, attempt, body: (200, chat_reply(f"EN {len(text)}"), 0))
    caps = [f"caption number {i}" for i in range(40)] + ["左乳低回声结节", "甲状腺结节，边界清"]
    write_manifest(tmp_path / "m.csv", caps)
    args = ["refine", str(tmp_path / "m.csv"), "--endpoint", server.url, "--model", "m",
            "--no-progress", "--temperature", "0.7", "--max-tokens", "64",
            "--repetition-penalty", "1.1", "--extra-body", '{"chat_template_kwargs": {"x": 1}}']
    cli.main(args + ["--out", str(tmp_path / "a.csv"), "--only-non-ascii"])
    body = server.requests[0]
    assert (body["temperature"], body["max_tokens"], body["repetition_penalty"]) == (0.7, 64, 1.1)
    assert body["chat_template_kwargs"] == {"x": 1} and body["top_p"] == 0.95
    status = [r["refine_status"] for r in read_csv(tmp_path / "a.csv")]
    assert status == ["skipped"] * 40 + ["ok", "ok"] and len(server.requests) == 2
    cli.main(args + ["--out", str(tmp_path / "b.csv"), "--fraction", "0.5", "--seed", "4"])
    picked = [r["refine_status"] == "ok" for r in read_csv(tmp_path / "b.csv")]
    assert 10 <= sum(picked) <= 32 and not all(picked[:40])
    cli.main(args + ["--out", str(tmp_path / "c.csv"), "--fraction", "0.5", "--seed", "4"])
    assert [r["refine_status"] == "ok" for r in read_csv(tmp_path / "c.csv")] == picked
    with pytest.raises(captions.CaptionError, match="fraction"):
        captions.RefineConfig(fraction=0)


def test_retry_waits_double_up_to_the_cap(monkeypatch):
    waits = []
    monkeypatch.setattr(llm.time, "sleep", waits.append)
    monkeypatch.setattr(llm.random, "uniform", lambda a, b: 1.0)     # no jitter
    monkeypatch.setattr(llm, "post_chat", lambda cfg, body: (_ for _ in ()).throw(
        llm.BadReply("the reply is not JSON")))
    chat = llm.ChatConfig("http://127.0.0.1:9/v1", "m", retries=4, backoff=0.5, max_backoff=3)
    stats = llm.Stats()
    with pytest.raises(llm.LLMError, match="5 tries.*not JSON"):
        llm.complete(chat, {"messages": []}, stats=stats)
    assert waits == [0.5, 1.0, 2.0, 3.0] and stats.retries == 4


@pytest.mark.parametrize("reason,fatal", [
    (socket.gaierror(-2, "Name or service not known"), "host nowhere.invalid not found"),
    (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    (TimeoutError("timed out"), None), (ConnectionResetError(104, "reset"), None)])
def test_unreachable_server_stops_at_once_but_timeouts_retry(monkeypatch, reason, fatal):
    waits = []
    monkeypatch.setattr(llm.time, "sleep", waits.append)
    monkeypatch.setattr(llm, "post_chat", lambda cfg, body: (_ for _ in ()).throw(
        urllib.error.URLError(reason)))
    chat = llm.ChatConfig("http://nowhere.invalid/v1", "m", retries=3, backoff=0.5)
    with pytest.raises(llm.FatalLLMError if fatal else llm.LLMError) as e:
        llm.complete(chat, {"messages": []})
    if fatal:
        assert str(e.value).startswith("cannot connect to http://nowhere.invalid/v1 (") and \
            fatal in str(e.value) and waits == []
    else:
        assert not isinstance(e.value, llm.FatalLLMError) and len(waits) == 3


def test_progress_bar_shows_rate_and_errors(tmp_path, monkeypatch, capsys):
    def post(cfg, body):
        if body["messages"] == "bad":
            raise llm.BadReply("empty reply")
        return "fine"
    monkeypatch.setattr(llm, "post_chat", post)
    chat = llm.ChatConfig("http://127.0.0.1:9/v1", "m", retries=1, backoff=0)
    bodies = {"a": {"messages": "ok"}, "b": {"messages": "bad"}, "c": {"messages": "ok 2"}}
    cache = llm.ReplyCache(tmp_path / "c.jsonl")
    replies, errors, stats = llm.run_requests(chat, bodies, cache, concurrency=2, progress=True)
    bar = capsys.readouterr().err.splitlines()[-1]
    assert "3/3" in bar and "req/s" in bar and "errors=1" in bar and "retries=1" in bar, bar
    assert set(replies) == {"a", "c"} and "empty reply" in errors["b"]


def test_output_is_replaced_atomically(tmp_path, monkeypatch):
    src, out = tmp_path / "m.csv", tmp_path / "o.csv"
    write_manifest(src, [CLINICAL])
    out.write_text("old output\n")

    def no_rename(a, b):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        captions.fit_manifest(src, out)
    assert out.read_text() == "old output\n"              # never half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "o.csv"]   # no temp left


def cli_error(capsys, argv) -> str:
    """The one-line message of a command that must exit 2 without a traceback."""
    status = exit_status(lambda: cli.main(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error: " in line]  # argparse's after its usage
    assert status == 2 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_user_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\nnot json\n')
    assert "bad.jsonl:2: not valid JSON" in cli_error(capsys, ["fit", str(bad), "--out", "o"])
    bad.write_text("[1, 2]\n")
    assert "one JSON object" in cli_error(capsys, ["fit", str(bad), "--out", "o"])
    gb = tmp_path / "gb.csv"
    gb.write_bytes("image,caption\na.png,左乳低回声结节\n".encode("gb18030"))
    assert "gb.csv: not UTF-8" in cli_error(capsys, ["fit", str(gb), "--out", "o"])
    ok = tmp_path / "m.csv"
    write_manifest(ok, ["a caption"])
    fit = ["fit", str(ok), "--out", str(tmp_path / "o.csv")]
    assert "at least 3" in cli_error(capsys, fit + ["--context-length", "2"])
    assert "m.csv: no caption column" in cli_error(capsys, fit + ["--caption-col", "nope"])
    assert "unrecognized" in cli_error(capsys, fit + ["--context", "20"])   # no abbreviations
    refine = ["refine", str(ok), "--out", str(tmp_path / "r.csv"), "--model", "m"]
    url = ["--endpoint", "http://127.0.0.1:9/v1"]
    assert "http(s) base URL" in cli_error(capsys, refine + ["--endpoint", "127.0.0.1:9/v1"])
    assert "--retries" in cli_error(capsys, refine + url + ["--retries", "-1"])
    err = cli_error(capsys, refine + url + ["--api-key", "sk-SECRET-42"])
    assert "--api-key-env" in err and "sk-SECRET-42" not in err
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    assert "NOT_SET_KEY" in cli_error(capsys, refine + url + ["--api-key-env", "NOT_SET_KEY"])
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "r.csv").exists()


def closed_port() -> int:
    """A port with nobody listening: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_fails_fast_naming_the_endpoint(tmp_path, capsys, no_proxy):
    write_manifest(tmp_path / "m.csv", [f"c{i}" for i in range(14)])
    url = f"http://127.0.0.1:{closed_port()}/v1"
    t0 = time.perf_counter()
    err = cli_error(capsys, ["refine", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o.csv"),
                             "--endpoint", url, "--model", "m", "--no-progress"])  # --retries 5
    assert time.perf_counter() - t0 < 3, "retried a refused connection"
    assert err == f"error: cannot connect to {url} (connection refused): is the server running?"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]   # no output, no cache


def test_template_flags_pick_layout_name_and_skip(tmp_path):
    root = tmp_path / "scans"            # benign/ alone would be read as BUSI
    for name in ("images/case0.png", "images/case1.png", "benign/other.png"):
        png(root / name)
    (root / "labels.csv").write_text("image,label\ncase0.png,benign\ncase1.png,oops\n")
    out = tmp_path / "c.csv"
    args = ["template", str(root), "--out", str(out), "--dataset", "folder", "--organ", "liver"]
    assert exit_status(lambda: cli.main(args)) == 2                # a bad label stops the run
    with pytest.warns(UserWarning, match="skipped"):
        cli.main(args + ["--skip-bad", "--dataset-name", "clinic A"])
    rows = read_csv(out)
    assert [(r["image"], r["label"], r["dataset"]) for r in rows] == [
        ("scans/images/case0.png", "benign", "clinic A")]


def test_refine_cli_flags_reach_the_run(tmp_path, serve, monkeypatch, capsys):
    def behave(text, attempt, body):
        if "organ: kidney" in text:
            return 503, b"down", 0
        if "organ: liver" in text:                               # first try past --timeout
            return 200, chat_reply(three("A liver caption.")), 1.0 if attempt == 0 else 0
        # breast rows: held until 3 are in flight (counted here, not by the server, which
        # still counts a timed-out liver request the client has given up on)
        with server.lock:
            held["now"] += 1
            held["max"] = max(held["max"], held["now"])
        deadline = time.time() + 0.4
        while held["now"] < 3 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)               # long enough for a 4th to arrive if one were sent
        with server.lock:
            held["now"] -= 1
        return 200, chat_reply(three(LONG_REPLY)), 0

    def three(caption):
        return "\n".join(f"{i}. {caption}" for i in (1, 2, 3))

    held = {"now": 0, "max": 0}

    server = serve(behave)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")      # a local server goes direct
    src = tmp_path / "m.csv"
    src.write_text("image,desc,organ,age\n" + "".join(f"b{i}.png,old {i},breast,{30 + i}\n"
                                                      for i in range(6)) +
                   "l.png,old l,liver,50\nk.png,old k,kidney,60\n")
    cache = tmp_path / "replies.jsonl"
    status = exit_status(lambda: cli.main([
        "refine", str(src), "--out", str(tmp_path / "o.csv"), "--endpoint", server.url, "--model", "m",
        "--mode", "describe", "--caption-col", "desc", "--top-p", "0.5", "--timeout", "0.5", "--retries",
        "1", "--backoff", "0", "--cache", str(cache), "--context-length", "20", "--concurrency", "3",
        "--no-progress"]))
    assert status == 1  # the kidney row failed: written, exit status 1
    body = server.requests[0]
    assert body["messages"][0]["content"] == captions.DESCRIBE_INSTRUCTIONS
    assert body["top_p"] == 0.5 and "old" not in body["messages"][-1]["content"]
    assert held["max"] == 3
    assert server.attempts["Metadata:\n- organ: kidney\n- age: 60"] == 2            # --retries
    assert server.attempts["Metadata:\n- organ: liver\n- age: 50"] == 2             # --timeout
    rows = read_csv(tmp_path / "o.csv")
    assert [r["refine_status"] for r in rows] == ["fitted"] * 6 + ["ok", "failed"]
    assert all(token_count(r["desc"]) <= 20 for r in rows) and rows[7]["desc"] == "old k"
    assert cache.is_file() and not (tmp_path / "o.csv.cache.jsonl").exists()
    printed = capsys.readouterr()
    assert "failed rows (0-based, header not counted): 7" in printed.out and "HTTP 503" in printed.out
    assert "1 of 8 rows kept their original caption" in printed.err
    defaults = cli.build_parser().parse_args(["refine", "m", "--out", "o", "--endpoint",
                                                   "http://h/v1", "--model", "m"])
    assert defaults.concurrency == 8 == captions.RefineConfig().concurrency


GO_ON = "interrupted: the answers received so far are cached; to go on, run the same command again: "


def test_ctrl_c_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "refine_manifest", interrupted)
    argv = ["refine", "m.csv", "--out", "o.csv", "--endpoint", "http://h/v1", "--model", "m"]
    assert exit_status(lambda: cli.main(argv)) == 130  # through report_errors' one handler
    assert capsys.readouterr().err == GO_ON + shlex.join(sys.orig_argv) + "\n"


def test_ctrl_c_in_a_real_run_is_one_line(tmp_path, serve):
    server = serve(lambda text, attempt, body: (200, chat_reply(f"EN: {text}"), 0.2))
    write_manifest(tmp_path / "m.csv", [f"caption {i}" for i in range(40)])
    out, cache = tmp_path / "out.csv", tmp_path / "out.csv.cache.jsonl"
    cmd = [sys.executable, "-m", "clip_us.captions", "refine", str(tmp_path / "m.csv"), "--out", str(out),
           "--endpoint", server.url, "--model", "m", "--concurrency", "1", "--no-progress"]
    # SIGINT back to its default in the child: a background job inherits it ignored
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not (cache.exists() and cache.read_text().count("\n")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == GO_ON + shlex.join(cmd) + "\n", err
    assert not out.exists() and len(server.requests) < 40


# ----------------------------------------------------------------------------- echocare mode
# EchoCare-CLIP's generate_llm_captions.py (TongxinWang0405/BMI702_project, commit 4b4205c):
# its system prompt's first and format lines, its user prompt, its vLLM defaults.
ECHOCARE_SYSTEM_START = ("You are a radiology assistant writing English captions for ultrasound "
                         "images.\nYou are given structured metadata fields (key: value pairs) "
                         "from a clinical dataset.\nProduce THREE DIFFERENT captions for the SAME "
                         "image.\n\nContent rules (apply to every caption):\n")
ECHOCARE_SYSTEM_END = ('- Prefix each line with "1. ", "2. ", "3. " (number, period, space) — no '
                       "other numbering style.\n")


def test_echocare_mode_is_the_authors_procedure(tmp_path, serve):
    reply = "1. Caption one.\n2. Caption two.\n3. \"Caption three.\""
    server = serve(lambda text, attempt, body: (200, chat_reply(reply), 0))
    src = tmp_path / "m.csv"
    rows = [("b0.png", "old b0", "breast", "benign", "BUSI", ""),
            ("c0.png", "natural carotid text", "carotid artery", "", "Carotid_Artery", ""),
            ("t0.png", "old t0", "thyroid", "malignant", "Thyroid_USData", ""),
            ("l0.png", "lung template caption", "lung", "normal", "Lung_ultrasound", ""),
            ("x0.png", "old x0", "", "", "BUSCoT", ""),
            ("r0.png", "old r0", "breast", "benign", "BrEaST", "4a")]
    rows += [(f"b{i}.png", f"old b{i}", "breast", "benign", "BUSI", "") for i in range(1, 30)]
    src.write_text("image,caption,organ,label,dataset,birads\n" +
                   "".join(",".join(r) + "\n" for r in rows))
    s = refine(src, tmp_path / "o.csv", server.url, mode="echocare")
    bodies = {b["messages"][1]["content"]: b for b in server.requests}
    busi = ("Dataset: BUSI\nStructured fields:\n- Tissue: breast\n- Condition: benign\n\n"
            "Write the three captions now, following the output format exactly.")
    lung = ("Dataset: Lung_ultrasound\nStructured fields:\n- Tissue: lung\n- OriginalCaption: "
            "lung template caption\n\nWrite the three captions now, following the output format "
            "exactly.")
    breast = ("Dataset: BrEaST\nStructured fields:\n- Tissue: breast\n- Condition: benign\n"
              "- BI-RADS: 4a\n\nWrite the three captions now, following the output format "
              "exactly.")
    assert set(bodies) == {busi, lung, breast}        # 30 BUSI rows: one identical request
    body = bodies[busi]
    system = body["messages"][0]["content"]
    assert body["messages"][0]["role"] == "system" and system.startswith(ECHOCARE_SYSTEM_START)
    assert ECHOCARE_SYSTEM_END in system and system.endswith("3. Third caption text here.")
    assert (body["temperature"], body["top_p"], body["repetition_penalty"], body["max_tokens"],
            body["seed"]) == (1.0, 0.95, 1.05, 320, 42)
    out = read_csv(tmp_path / "o.csv")
    assert [r["refine_status"] for r in out[1:5]] == ["skipped", "skipped", "ok", "skipped"]
    assert [r["caption"] for r in out[1:5:3]] == ["natural carotid text", "old x0"]
    assert out[2]["caption"] == "old t0"                # usdata wins over the thyroid token
    # the pick: one random.Random(42), rng.choice per image in row order, over the three lines
    rng, options = random.Random(42), ["Caption one.", "Caption two.", "Caption three."]
    expected = [rng.choice(options) for _ in range(s["ok"])]
    assert [r["caption"] for r in out if r["refine_status"] == "ok"] == expected
    assert len(set(expected)) == 3
    refine(src, tmp_path / "p.csv", server.url, mode="echocare", seed=7)
    assert server.requests[-1]["seed"] == 7
    rng = random.Random(7)
    assert [r["caption"] for r in read_csv(tmp_path / "p.csv") if r["refine_status"] == "ok"] \
        == [rng.choice(options) for _ in range(s["ok"])]


def test_echocare_mode_needs_a_dataset_and_fields(tmp_path, serve):
    server = serve(lambda text, attempt, body: (200, chat_reply("1. A.\n2. B.\n3. C."), 0))
    (tmp_path / "m.csv").write_text("image,caption,organ\na.png,x,liver\n")
    with pytest.raises(captions.CaptionError, match="dataset column"):
        refine(tmp_path / "m.csv", tmp_path / "o.csv", server.url, mode="echocare")
    (tmp_path / "n.csv").write_text("image,caption,dataset\na.png,x,Liver_ultrasound_AULI\n")
    with pytest.raises(captions.CaptionError, match="no metadata fields"):
        refine(tmp_path / "n.csv", tmp_path / "o.csv", server.url, mode="echocare")
    assert not server.requests
    translate = captions.RefineConfig()
    assert translate.seed == 0 and "seed" not in translate.params   # only echocare sends it


def test_echocare_candidates_and_cli_defaults():
    from clip_us.captions import echocare
    assert echocare.candidates("<think>x</think>1. A  b.\n\n(2) 'C.'\n- D.\nE") == \
        ["A b.", "C.", "D.", "E"]
    assert echocare.candidates("   ") == []
    a = cli.build_parser().parse_args(["refine", "m", "--out", "o", "--endpoint", "http://h/v1",
                                       "--mode", "echocare"])
    assert a.model is None and a.seed is None
    assert cli.MODE_MODEL["echocare"] == "Qwen/Qwen3-4B-Instruct-2507"
    help_text = cli.build_parser().format_help() + cli.build_parser()._subparsers._group_actions[
        0].choices["refine"].format_help()
    assert "buscot, carotid, usdata" in " ".join(help_text.split())
