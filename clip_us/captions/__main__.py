"""python -m clip_us.captions template|fit|refine|pmc-ultrasound ...: the caption tools' command line.

The tools themselves are templates.py (the tiers, template manifests, fitting to 77 tokens, LLM
refinement), echocare.py (EchoCare-CLIP's LLM captions), pmc.py (PMC-OA's ultrasound subset),
llm.py (the HTTP client) and manifest.py (the one manifest reader); their module docstrings have
the examples. Errors end as every clip_us command line's do (clip_us.config):
one `error:` line and exit status 2, and Ctrl-C one `interrupted:` line and status 130.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from ..config import (
    command_line,
    command_parser,
    fail,
    on_interrupt,
    opt,
    parse_command,
    report_errors,
    required,
)
from .echocare import SKIP_TOKENS as ECHOCARE_SKIP
from .llm import ChatConfig
from .pmc import MIN_SIDE, rule_text, select_ultrasound, selection_path
from .templates import (
    CONTEXT_LENGTH,
    MODE_DEFAULTS,
    MODE_MODEL,
    CaptionError,
    RefineConfig,
    fit_manifest,
    refine_manifest,
    template_manifest,
)


def print_refine_summary(s: dict) -> None:
    rate = s["sent"] / s["seconds"] if s["seconds"] else 0.0
    print(f"refined {s['rows']} rows: {s['requests']} requests ({s['cached']} from the cache, "
          f"{s['sent']} sent, {s['retries']} retries, {rate:.2f} req/s)")
    print(f"  ok {s['ok']}, fitted to the context {s['fitted']}, skipped {s['skipped']}, "
          f"failed {s['failed']} (original caption kept)")
    if s["failed_rows"]:
        print("  failed rows (0-based, header not counted): "
              + ", ".join(map(str, s["failed_rows"])))
        for i in s["failed_rows"][:5]:
            print(f"    row {i}: {s['errors'][i]}")
        print("  rerun the same command to retry only these rows (answers are cached)")
    if s["torn_cache_lines"]:
        print(f"  {s['torn_cache_lines']} unreadable cache line(s) skipped (a run killed while "
              f"writing); any answer on them was asked for again")
    print(f"wrote {s['out']} (cache {s['cache']}) in {s['seconds']:.1f} s")


# ----------------------------------------------------------------------------- command line
def _json_object(value: str) -> dict:
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {value!r}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"key\": 1}}', "
                                         f"got {value!r}")
    return obj


def _penalty(value: str):
    return 0.0 if value.lower() in ("none", "off") else float(value)


def _no_key_on_command_line(value: str):
    # argparse prints only this message, never the value, so the key is not echoed either
    raise argparse.ArgumentTypeError("a key on the command line shows in ps and the shell "
                                     "history; put it in an environment variable and name that "
                                     "with --api-key-env (default OPENAI_API_KEY)")


def _mode_model() -> str:
    return ", ".join(f"{mode} {model}" for mode, model in MODE_MODEL.items())


def _mode_default(name: str) -> str:
    """What --mode sets `name` to when it is not given, for the help: 'translate 0.2, ...'."""
    return ", ".join(f"{mode} {'none' if values[name] is None else values[name]}"
                     for mode, values in MODE_DEFAULTS.items())


@dataclass(kw_only=True)
class _Output:
    """What every subcommand writes: a manifest whose captions fit CLIP's context (and --debug)."""
    out: str = required("manifest to write (.csv, or .jsonl)")
    context_length: int = opt(CONTEXT_LENGTH, "most CLIP tokens per caption, start and end tokens "
                              "included")
    debug: bool = opt(False, "show the traceback of an error")


@dataclass(kw_only=True)
class TemplateCommand(_Output):
    """template captions for a data set folder or metadata CSV"""
    data: str = required("data set folder (busi, nextgen, tn3k, folder layouts) or a CSV/JSONL "
                         "of metadata", positional=True)
    dataset: str | None = opt(None, "layout of the folder (default: detected)",
                              choices=["busi", "nextgen", "prostate", "tn3k", "ddti", "folder"])
    nextgen_name: str | None = opt(None, "<DS> of the nextgen layout (default: the only one "
                                   "there)")
    organ: str | None = opt(None, "organ for every row (default: from the data set's name)")
    dataset_name: str | None = opt(None, "the dataset column (default: the folder's name)")
    seed: int = opt(0, "random seed of every row's tier and template (drawn with the row and "
                    "image)")
    tier_weights: str = opt("20,30,50", "how often tiers 1,2,3 are drawn, in percent")
    image_col: str | None = opt(None, "image column of a CSV (default: detected)")
    skip_bad: bool = opt(False, "skip bad files instead of stopping")


@dataclass(kw_only=True)
class _Rewrite(_Output):
    """fit and refine: they rewrite the captions of a manifest."""
    manifest: str = required("image-caption manifest to read (CSV or JSONL)", positional=True)
    caption_col: str | None = opt(None, "caption column (default: detected)")


@dataclass(kw_only=True)
class FitCommand(_Rewrite):
    """shorten captions to CLIP's 77 tokens (--context-length)"""


@dataclass(kw_only=True)
class RefineCommand(_Rewrite):
    """rewrite captions with an OpenAI-compatible LLM"""
    endpoint: str = required("OpenAI-style base URL, e.g. http://127.0.0.1:8000/v1")
    model: str | None = opt(None, f"the model the server runs (default: the mode's, "
                            f"{_mode_model()})")
    mode: str = opt("translate", "translate: one English clinical sentence (the ultrasound-CLIP "
                    "paper's CURD captions); echocare: EchoCare-CLIP's generate_llm_captions.py, "
                    "its prompts copied: rows of data sets whose name contains "
                    f"{', '.join(ECHOCARE_SKIP)} are kept as they are, lung rows are rewritten "
                    "from their caption, every other row is written from its organ (Tissue), "
                    "label (Condition) and other metadata columns (a dataset column is needed); "
                    "three numbered captions per row, one kept by random.Random(--seed) in row "
                    "order; describe: our wording of that, one caption kept per row",
                    choices=sorted(MODE_DEFAULTS))
    api_key_env: str | None = opt(None, "environment variable holding the API key, never printed "
                                  "(default OPENAI_API_KEY if set; a variable named here must "
                                  "be set)")
    api_key: str | None = opt(None, argparse.SUPPRESS, type=_no_key_on_command_line)
    concurrency: int = opt(8, "requests in flight")
    temperature: float | None = opt(None, f"sampling temperature (default: the mode's, "
                                    f"{_mode_default('temperature')})", type=float)
    top_p: float | None = opt(None, f"nucleus sampling's top_p (default: the mode's, "
                              f"{_mode_default('top_p')})", type=float)
    repetition_penalty: float | None = opt(
        None, f"repetition penalty; 'none' leaves it out of the request (default: the mode's, "
        f"{_mode_default('repetition_penalty')})", type=_penalty)
    max_tokens: int | None = opt(None, f"most new tokens per reply (default: the mode's, "
                                 f"{_mode_default('max_tokens')})", type=int)
    seed: int | None = opt(None, f"random seed: the rows --fraction picks, the caption kept "
                           f"(echocare: also sent as the request's seed) (default: the mode's, "
                           f"{_mode_default('seed')})", type=int)
    timeout: float = opt(120.0, "seconds per request")
    retries: int = opt(5, "tries after the first")
    backoff: float = opt(1.0, "first wait in s, doubled per retry")
    cache: str | None = opt(None, "reply cache (default: OUT.cache.jsonl)")
    fraction: float = opt(1.0, "refine a seeded fraction of rows")
    only_non_ascii: bool = opt(False, "refine only non-English rows")
    extra_body: dict = opt({}, 'more request fields as JSON, e.g. \'{"chat_template_kwargs": '
                           '{"enable_thinking": false}}\' (vLLM, Qwen3)', type=_json_object)
    progress: bool = opt(True, "a progress bar (--no-progress: none)")


@dataclass(kw_only=True)
class PmcUltrasoundCommand:
    """PMC-OA's ultrasound subset (the ultrasound-CLIP paper's §4.1; the rule is ours)"""
    jsonl: str = required("PMC-OA's JSONL (pmc_oa.jsonl or train/valid/test.jsonl): one "
                          '{"image": ..., "caption": ...} per line', positional=True)
    out: str = required("manifest to write (.csv, or .jsonl) for train_contrastive.py; the counts "
                        "go beside it as <stem>.selection.json")
    images: str | None = opt(None, "folder of PMC-OA's images (default: images/ beside the JSONL)")
    min_side: int = opt(MIN_SIDE, "drop images whose shorter side is below this many pixels "
                        f"(default {MIN_SIDE}: CLIP ViT-B/16's input, so none is upsampled)")
    keep_mixed: bool = opt(False, "keep captions that also name another modality or a "
                           "non-imaging use (the rule's exclusions)")
    debug: bool = opt(False, "show the traceback of an error")


# the rule's terms in the subcommand's --help (its description is the docstring)
PmcUltrasoundCommand.__doc__ += f"\n\nThe rule (docs/captions.md): a row is {rule_text()}."


def print_selection(s: dict) -> None:
    dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items())
    print(f"kept {s['kept']} of {s['rows']} rows (min side {s['rule']['min_side']} px); "
          f"dropped: {dropped}")
    print("  kept by term: " + ", ".join(f"{k} {v}" for k, v in s["kept_by_term"].items()))
    if s["excluded_by"]:
        print("  excluded by: " + ", ".join(f"{k} {v}" for k, v in s["excluded_by"].items()))
    print(f"wrote {s['out']} and {selection_path(s['out'])}")


COMMANDS = {"template": TemplateCommand, "fit": FitCommand, "refine": RefineCommand,
            "pmc-ultrasound": PmcUltrasoundCommand}
# allow_abbrev=False: a prefix must not quietly become another flag (--api-key as --api-key-env
# would take the key for a variable name and send no key)
PARSER = {"prog": "python -m clip_us.captions", "allow_abbrev": False,
          "description": "Caption manifests: three-tier templates, fitting to 77 CLIP tokens, "
                         "LLM refinement, PMC-OA's ultrasound subset."}


def build_parser() -> argparse.ArgumentParser:
    return command_parser(COMMANDS, **PARSER)


def api_key(env_name: str | None) -> str | None:
    """The key from the variable --api-key-env names (which must be set), else from
    OPENAI_API_KEY if set, else None (local servers need none)."""
    key = os.environ.get(env_name or "OPENAI_API_KEY") or None
    if env_name and key is None:
        raise CaptionError(f"--api-key-env {env_name}: that environment variable is not set or "
                           f"empty; export {env_name}=..., or leave out --api-key-env")
    return key


def run_refine(a: RefineCommand) -> dict:
    key_env = a.api_key_env or "OPENAI_API_KEY"
    chat = ChatConfig(a.endpoint, a.model or MODE_MODEL[a.mode],
                      api_key=api_key(a.api_key_env), timeout=a.timeout, retries=a.retries,
                      backoff=a.backoff)
    rcfg = RefineConfig(mode=a.mode, temperature=a.temperature, top_p=a.top_p,
                        repetition_penalty=a.repetition_penalty, max_tokens=a.max_tokens,
                        seed=a.seed, context_length=a.context_length, concurrency=a.concurrency,
                        fraction=a.fraction, only_non_ascii=a.only_non_ascii,
                        caption_col=a.caption_col, cache=a.cache, progress=a.progress,
                        extra_body=a.extra_body)
    key_note = f"key from ${key_env}" if chat.api_key else "no API key"
    print(f"refine {a.manifest} -> {a.out}: {chat.url}, model {chat.model}, mode {rcfg.mode}, "
          f"{rcfg.params}, seed {rcfg.seed}, concurrency {rcfg.concurrency}, {key_note}")
    on_interrupt(lambda: "the answers received so far are cached; to go on, run the same "
                         f"command again: {command_line()}")
    summary = refine_manifest(a.manifest, a.out, chat, rcfg)
    print_refine_summary(summary)
    return summary


def main(argv=None) -> None:
    a = parse_command(COMMANDS, argv, **PARSER)
    report_errors(a.debug)  # a bad file or setting: one line, status 2; Ctrl-C: one line, 130
    if isinstance(a, TemplateCommand):
        s = template_manifest(a.data, a.out, a.dataset, a.organ, a.dataset_name, a.seed,
                              a.tier_weights, a.image_col, a.nextgen_name, a.skip_bad,
                              a.context_length)
        print(f"wrote {s['rows']} captions to {s['out']} (tiers 1/2/3: "
              f"{s['tiers'][1]}/{s['tiers'][2]}/{s['tiers'][3]})")
    elif isinstance(a, PmcUltrasoundCommand):
        print_selection(select_ultrasound(a.jsonl, a.out, a.images, a.min_side, a.keep_mixed))
    elif isinstance(a, FitCommand):
        s = fit_manifest(a.manifest, a.out, a.caption_col, a.context_length)
        print(f"fitted {s['rows']} captions to {a.context_length} tokens: {s['changed']} "
              f"changed; wrote {s['out']}")
    elif (s := run_refine(a))["failed"]:  # written, but incomplete: status 1, not done
        fail(f"{s['failed']} of {s['rows']} rows kept their original caption (requests "
             f"failed); rerun the same command to retry only those", status=1)


if __name__ == "__main__":
    main()
