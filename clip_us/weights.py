"""CLIP weights: published names -> URL + SHA256, the download cache, and every checkpoint format
turned into one OpenAI-named state dict.

Follows OpenAI's `clip/clip.py` (`_MODELS`, `_download`, `load`) for names, URLs and the cache;
Hugging Face's `convert_clip_original_pytorch_to_hf.py` (read backwards) for `CLIPModel` keys;
open_clip's checkpoint layout (`state_dict`, `module.` prefixes), which MetaCLIP also uses.

    model, preprocess = load("ViT-B/16")              # cache, else download (SHA256-checked)
    sd, info = load_state_dict("path/to/hf_folder")   # OpenAI keys + info["config"]
    hf = openai_to_hf(sd); hf_config_for(info["config"])  # and back (clip_us.export writes them)
    clip = build_clip("none", "tiny")                 # the scripts' --weights/--arch: a CLIP

Formats (`load_state_dict` detects them from the file, not its name):
- OpenAI TorchScript archives (`ViT-B-16.pt`): `torch.jit.load` on the CPU, and only `.state_dict()`
  is read; nothing in the archive runs. (`torch.load(weights_only=True)` cannot read them.)
- any other pickle (plain state dicts, open_clip/MetaCLIP checkpoints, HF `pytorch_model.bin`):
  `torch.load(weights_only=True)`. A file that needs code to unpickle is refused, never run.
- HF `model.safetensors`: read by `read_safetensors` below (and written by `write_safetensors`, for
  clip_us.export); the package is not a dependency.

Activation (not visible in tensors; a wrong one silently costs accuracy, so it is printed):
HF `config.json` decides when present; else `quick_gelu=`; else QuickGELU for OpenAI names and
TorchScript archives (only OpenAI publishes those) and GELU for other files, open_clip's default.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import replace

import torch
from tqdm import tqdm

from .fileio import atomic_path, cache_dir
from .model import ARCHS, CLIP, CLIPConfig, build_model, config_from_state_dict
from .transform import Preprocess

_URL = "https://openaipublic.azureedge.net/clip/models/{}/{}"
# OpenAI's published ViT weights; the SHA256 is also the folder in the URL (OpenAI's convention).
_MODELS = {
    "ViT-B/32": _URL.format("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
                            "ViT-B-32.pt"),
    "ViT-B/16": _URL.format("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
                            "ViT-B-16.pt"),
    "ViT-L/14": _URL.format("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
                            "ViT-L-14.pt"),
    "ViT-L/14@336px": _URL.format(
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt"),
}
_RESNETS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")  # published, but not ViTs
_TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_REQUIRED = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
             "positional_embedding", "ln_final.weight", "text_projection")


def available_models() -> list[str]:
    """The names `load` downloads: OpenAI's published ViT CLIPs."""
    return list(_MODELS)


def model_sha256(name: str) -> str:
    return _MODELS[name].split("/")[-2]


# ----------------------------------------------------------------------------- cache, download
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dst, what: str) -> str:
    """Stream `url` into the open file `dst` with a tqdm bar; return the SHA256 of the bytes."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url) as src:
        total = int(src.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what) as bar:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    return h.hexdigest()


def download(url: str, sha256: str, download_root: str | None = None) -> str:
    """Path of `url`'s file in the cache, downloading it when absent or when its hash is wrong.

    The bytes go to a temporary file in the cache folder (fileio.atomic_path), renamed only once
    the SHA256 matches, so an interrupted or corrupted download never sits in the cache under the
    real name.
    """
    root = cache_dir(download_root)
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        got = file_sha256(target)
        if got == sha256:
            return target
        warnings.warn(f"{target} has SHA256 {got}, expected {sha256}: the cached file is corrupt "
                      f"or incomplete; downloading it again")
    try:
        with atomic_path(target) as tmp, open(tmp, "wb") as dst:
            got = _fetch(url, dst, os.path.basename(target))
            if got != sha256:
                raise RuntimeError(f"downloaded {url} has SHA256 {got}, expected {sha256}: the "
                                   f"download is corrupt; nothing was written to {target}. "
                                   f"Try again.")
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"could not download {url} ({e}). Offline? Fetch that file on another machine and "
            f"put it at {target} (SHA256 {sha256}); or set CLIP_US_CACHE / download_root to the "
            f"folder that holds it, or pass the file's path instead of a name.") from e
    return target


def resolve(name_or_path: str, download_root: str | None = None) -> str:
    """A local file/folder path as given, or a published name -> its cached (or fetched) file."""
    if os.path.exists(name_or_path):
        return name_or_path
    if name_or_path in _MODELS:
        return download(_MODELS[name_or_path], model_sha256(name_or_path), download_root)
    hint = " (ResNet CLIPs are not supported: only ViTs)" if name_or_path in _RESNETS else ""
    raise FileNotFoundError(f"{name_or_path!r} is neither an existing file or folder nor a "
                            f"model name{hint}; names: {available_models()}")


# ----------------------------------------------------------------------------- file formats
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _st_header(path: str, f) -> tuple[dict, int]:
    """(JSON header, payload size) of a safetensors file; a short file is named as truncated."""
    size = os.path.getsize(path)
    n = int.from_bytes(f.read(8), "little")
    if size < 8 or n > size - 8:
        raise ValueError(f"{path}: truncated safetensors file (header says {n} bytes, the file "
                         f"has {size}); download or copy it again")
    try:
        return json.loads(f.read(n)), size - 8 - n
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: the safetensors header is not valid JSON ({e}); the file is "
                         f"corrupt") from e


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file: 8-byte little-endian header length, JSON header, raw tensor bytes.

    Each header entry is {"dtype", "shape", "data_offsets": [begin, end]}, offsets relative to
    the payload after the header; "__metadata__" holds strings. Tensors are little-endian.
    """
    with open(path, "rb") as f:
        header, payload_size = _st_header(path, f)
        payload = bytearray(f.read())
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta.get('dtype')}")
        dtype, shape = _ST_DTYPES[meta["dtype"]], meta["shape"]
        begin, end = meta["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        if end > payload_size or end - begin != numel * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} needs bytes {begin}..{end} of a {payload_size}"
                             f"-byte payload; the file is truncated or corrupt")
        if numel == 0:  # frombuffer refuses empty views
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        buf = payload if begin % dtype.itemsize == 0 else bytearray(payload[begin:end])
        off = begin if buf is payload else 0
        out[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=off).view(shape)
    return out


# safetensors lays tensors out by dtype, widest first (its Rust `Dtype` enum, declared narrow to
# wide: this is that order for the dtypes above), then by name; written the same way, with its
# compact JSON header, our files are byte-identical to safetensors.torch.save_file's.
_ST_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


def _st_layout(tensors: dict, metadata: dict | None) -> tuple[bytes, list]:
    """(8-byte length + JSON header padded with spaces to 8 bytes, tensors in file order)."""
    bad = [f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype not in _ST_NAMES]
    if bad:
        raise ValueError(f"safetensors cannot hold {_listing(bad)}; convert them to one of "
                         f"{sorted(_ST_NAMES, key=str)}")
    order = sorted(tensors.items(), key=lambda kv: (-_ST_ORDER.index(_ST_NAMES[kv[1].dtype]), kv[0]))
    header, offset = ({} if metadata is None else {"__metadata__": metadata}), 0
    for name, t in order:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, [t for _, t in order]


def _preallocate(f, size: int) -> None:
    """Reserve the file's `size` bytes in one call: on ext4 the writes then took 0.2 s instead
    of 0.55 s for a ViT-B/16 (600 MB) than when each one grows the file. Where the call is
    missing (macOS) or the file system refuses it, the writes grow the file as before."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None and size > 0:
        with contextlib.suppress(OSError):
            fallocate(f.fileno(), 0, size)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """The format read_safetensors reads, written through a temporary file (fileio.atomic_path),
    each tensor's bytes straight from its memory (no copy unless it is not contiguous).

    Bytes are the host's, which is little-endian on every machine torch ships for, as the
    reader also assumes; `metadata` (strings only) becomes "__metadata__".
    """
    if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"safetensors metadata holds strings only, got {metadata}")
    head, order = _st_layout(tensors, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _preallocate(f, len(head) + sum(t.numel() * t.element_size() for t in order))
        f.write(head)
        for t in order:
            if t.numel():  # [N] uint8 view of the raw bytes; an empty tensor has none
                f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # JSON header right after the 8-byte length


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files with compiled code and constants, unlike torch.save's."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_torchscript(path: str) -> dict:
    try:
        with warnings.catch_warnings():  # torch's "jit is deprecated" notice is not for our users
            warnings.filterwarnings("ignore", message=".*deprecated", category=FutureWarning)
            archive = torch.jit.load(path, map_location="cpu")  # compiled, never called
    except RuntimeError as e:
        raise ValueError(f"{path}: could not read the TorchScript archive ({e}); the file may be "
                         f"corrupt: download or copy it again") from e
    return {k: v.detach() for k, v in archive.state_dict().items()}


def _read_pickle(path: str):
    """torch.load(weights_only=True): tensors and plain containers only, nothing executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e}); the file is "
                             f"truncated or corrupt") from e
        raise ValueError(
            f"refused to load {path}: unpickling it needs arbitrary code (torch says: "
            f"{str(e).splitlines()[-1].strip()}). clip_us reads pickles only with "
            f"weights_only=True and ran nothing. If you trust the file, re-save just its tensors: "
            f"torch.save(state_dict, 'clean.pt').") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: could not read this checkpoint ({type(e).__name__}: "
                         f"{str(e)[:200]}); the file is truncated or corrupt: download or copy "
                         f"it again") from e


def _checkpoint_file(path: str) -> str:
    """A folder (Hugging Face layout) -> its weights file."""
    if not os.path.isdir(path):
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"folder {path} has neither model.safetensors nor pytorch_model.bin; "
                            f"pass a checkpoint file or a Hugging Face CLIPModel folder")


def read_checkpoint(path: str) -> tuple[dict, str]:
    """(raw tensors dict, "torchscript" | "safetensors" | "pickle") for a file or HF folder."""
    path = _checkpoint_file(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty; download or copy it again")
    if _is_safetensors(path):
        return read_safetensors(path), "safetensors"
    with open(path, "rb") as f:
        is_zip_magic = f.read(2) == b"PK"
    if is_zip_magic and not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: truncated or corrupt zip archive (no central directory); "
                         f"download or copy it again")
    if is_zip_magic and _is_torchscript(path):
        return _read_torchscript(path), "torchscript"
    return _read_pickle(path), "pickle"


# ----------------------------------------------------------------------------- key names
_HF_TOWERS = (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
              ("text_model.encoder.layers.", "transformer.resblocks."))
_HF_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
             "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_TOP = {"vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
           "vision_model.embeddings.class_embedding": "visual.class_embedding",
           "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "logit_scale": "logit_scale"}
_HF_LN = {"vision_model.pre_layrnorm": "visual.ln_pre",  # sic: HF's spelling
          "vision_model.post_layernorm": "visual.ln_post", "text_model.final_layer_norm": "ln_final"}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def is_hf(sd: dict) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def _block_key(key: str, towers=_HF_TOWERS, modules=_HF_BLOCK) -> str | None:
    """A block tensor's name in the other format, by the (from, to) tower prefixes and the module
    map: 'vision_model.encoder.layers.3.mlp.fc1.weight' -> 'visual.transformer.resblocks.3.mlp.c_fc.weight'
    with the defaults (HF -> OpenAI); None for a key of no block module."""
    for src, dst in towers:
        if key.startswith(src):
            n, rest = key[len(src):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            if module in modules:
                return f"{dst}{n}.{modules[module]}.{leaf}"
    return None


def _hf_qkv(sd: dict, out: dict, bad: list) -> None:
    """Concatenate each block's q/k/v projections into OpenAI's packed in_proj (rows q, k, v)."""
    for hf, ours in _HF_TOWERS:
        blocks = {k[len(hf):].split(".")[0] for k in sd if k.startswith(hf)}
        for n in sorted(blocks, key=int):
            for leaf, packed in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
                keys = [f"{hf}{n}.self_attn.{p}_proj.{leaf}" for p in "qkv"]
                missing = [k for k in keys if k not in sd]
                if missing:
                    bad.extend(f"missing {k}" for k in missing)
                    continue
                out[f"{ours}{n}.attn.{packed}"] = torch.cat([sd[k] for k in keys])


def hf_to_openai(sd: dict) -> dict:
    """Hugging Face CLIPModel keys -> OpenAI keys; unknown keys are an error that lists them."""
    out, bad = {}, []
    _hf_qkv(sd, out, bad)
    for k, v in sd.items():
        if k.endswith("position_ids") or k.split(".")[-2:-1] in (["q_proj"], ["k_proj"], ["v_proj"]):
            continue  # position_ids is an index buffer; q/k/v were packed above
        module, _, leaf = k.rpartition(".")
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif k in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[k]] = v.t()  # nn.Linear weight [out, in] -> OpenAI's x @ proj
        elif module in _HF_LN:
            out[f"{_HF_LN[module]}.{leaf}"] = v
        elif _block_key(k):
            out[_block_key(k)] = v
        else:
            bad.append(f"unexpected {k}")
    if bad:
        raise ValueError(f"Hugging Face checkpoint is not a CLIPModel this code can convert: "
                         f"{_listing(bad)}")
    return out


# The same tables read backwards, for writing a CLIPModel (clip_us.export).
_OPENAI_TOWERS = tuple((ours, hf) for hf, ours in _HF_TOWERS)
_OPENAI_BLOCK = {ours: hf for hf, ours in _HF_BLOCK.items()}
_OPENAI_TOP = {ours: hf for hf, ours in _HF_TOP.items()}
_OPENAI_LN = {ours: hf for hf, ours in _HF_LN.items()}
_OPENAI_TRANSPOSED = {ours: hf for hf, ours in _HF_TRANSPOSED.items()}


def _split_qkv(key: str, value: torch.Tensor, out: dict) -> bool:
    """OpenAI's packed in_proj (rows q, k, v) -> HF's q_proj/k_proj/v_proj into `out`, views of
    its three row blocks (copied only if not contiguous); False when `key` is no in_proj."""
    for hf, ours in _HF_TOWERS:
        if key.startswith(ours) and key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            n, leaf = key[len(ours):].split(".")[0], key.rsplit("_", 1)[1]
            for p, part in zip("qkv", value.chunk(3)):  # [3 * width, ...] -> 3 x [width, ...]
                out[f"{hf}{n}.self_attn.{p}_proj.{leaf}"] = part.contiguous()
            return True
    return False


def openai_to_hf(sd: dict) -> dict:
    """OpenAI keys -> Hugging Face CLIPModel keys (hf_to_openai's inverse). Tensors are `sd`'s
    own or views of them (q/k/v: row blocks of in_proj, which never overlap); only the two
    transposed projections are copies. Any other key (an adapter's, a head's) is an error that
    lists them: a CLIPModel has no place for it."""
    out, bad = {}, []
    for k, v in sd.items():
        module, _, leaf = k.rpartition(".")
        if _split_qkv(k, v, out):
            continue
        if k in _OPENAI_TOP:
            out[_OPENAI_TOP[k]] = v
        elif k in _OPENAI_TRANSPOSED:
            out[_OPENAI_TRANSPOSED[k]] = v.t().contiguous()  # x @ proj -> nn.Linear [out, in]
        elif module in _OPENAI_LN:
            out[f"{_OPENAI_LN[module]}.{leaf}"] = v
        elif _block_key(k, _OPENAI_TOWERS, _OPENAI_BLOCK):
            out[_block_key(k, _OPENAI_TOWERS, _OPENAI_BLOCK)] = v
        else:
            bad.append(k)
    if bad:
        raise ValueError(f"not a plain CLIP state dict: a Hugging Face CLIPModel has no place for "
                         f"{_listing(bad)}")
    return out


def _listing(items: list, n: int = 12) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def state_dict_problems(sd: dict, model) -> str:
    """Missing, unexpected and wrongly shaped keys of `sd` against `model`, listed for one error
    ("" when it fits): the loaders of other families (Swin, BERT) say all that is wrong at once."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    bad = [f"missing {k}" for k in expected if k not in sd]
    bad += [f"unexpected {k}" for k in sd if k not in expected]
    bad += [f"{k}: shape {tuple(sd[k].shape)}, expected {tuple(s)}"
            for k, s in expected.items() if k in sd and sd[k].shape != s]
    return f"({len(bad)} problems): {_listing(bad)}" if bad else ""


def unwrap(obj, path: str) -> dict:
    """open_clip/MetaCLIP checkpoints {"state_dict": {"module.<key>": ...}} -> a flat state dict."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else f"dict with keys {_listing(list(obj), 8)}"
        raise ValueError(f"{path}: not a CLIP checkpoint: expected a state dict of tensors (or "
                         f"one under 'state_dict'), found a {kind}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- checks, config
def check_state_dict(sd: dict, cfg: CLIPConfig, path: str) -> None:
    """Missing, unexpected and wrongly shaped keys against a model of `cfg`, listed in one error."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {k: v.shape for k, v in CLIP(cfg).state_dict().items()}
    bad = [f"missing {k}" for k in expected if k not in sd]
    bad += [f"unexpected {k}" for k in sd if k not in expected]
    bad += [f"{k}: shape {tuple(sd[k].shape)}, expected {tuple(s)}"
            for k, s in expected.items() if k in sd and sd[k].shape != s]
    if bad:
        raise ValueError(f"{path}: not a CLIP ViT checkpoint of the inferred size "
                         f"({len(bad)} problems): {_listing(bad)}")


def _named_heads(cfg: CLIPConfig) -> CLIPConfig:
    """Head counts are not in the tensors: take them from a named architecture of the same sizes
    (the tiny one has 2 heads at width 64), else keep OpenAI's one head per 64 channels."""
    for arch in ARCHS.values():
        if replace(arch, vision_heads=cfg.vision_heads, transformer_heads=cfg.transformer_heads,
                   quick_gelu=cfg.quick_gelu) == cfg:
            return replace(cfg, vision_heads=arch.vision_heads,
                           transformer_heads=arch.transformer_heads)
    return cfg


def hf_config(path: str) -> dict | None:
    """The HF config.json beside a weights file (or inside its folder), if there is one."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f)


_HF_ACTS = {"quick_gelu": True, "gelu": False}


def hf_settings(cfg: dict, path: str) -> dict:
    """quick_gelu and head counts from an HF CLIPConfig; absent fields take HF's defaults
    (save_pretrained writes only the fields that differ from them)."""
    vis = cfg.get("vision_config") or cfg.get("vision_config_dict") or {}
    txt = cfg.get("text_config") or cfg.get("text_config_dict") or {}
    acts = {vis.get("hidden_act", "quick_gelu"), txt.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(_HF_ACTS):
        raise ValueError(f"{path}: config.json asks for hidden_act {sorted(acts)}; clip_us supports "
                         f"one of {sorted(_HF_ACTS)} shared by both towers")
    return {"quick_gelu": _HF_ACTS[acts.pop()], "vision_heads": vis.get("num_attention_heads", 12),
            "transformer_heads": txt.get("num_attention_heads", 8)}


def hf_config_for(cfg: CLIPConfig) -> dict:
    """The config.json of a Hugging Face CLIPModel of `cfg` (hf_settings read backwards). Every
    size is written out: HF's defaults are ViT-B/32's. The token ids are CLIPTextConfig's
    defaults, the tokenizer's real ones (with them, HF pools at the first end-of-text token,
    which is where our argmax pools)."""
    act = {qg: name for name, qg in _HF_ACTS.items()}[cfg.quick_gelu]
    both = {"hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": cfg.embed_dim}
    text = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.transformer_width,
            "intermediate_size": 4 * cfg.transformer_width,
            "num_hidden_layers": cfg.transformer_layers,
            "num_attention_heads": cfg.transformer_heads,
            "max_position_embeddings": cfg.context_length, "bos_token_id": 49406,
            "eos_token_id": 49407, "model_type": "clip_text_model", **both}
    vision = {"hidden_size": cfg.vision_width, "intermediate_size": 4 * cfg.vision_width,
              "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
              "image_size": cfg.image_resolution, "patch_size": cfg.vision_patch_size,
              "num_channels": 3, "model_type": "clip_vision_model", **both}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": 2.6592, "text_config": text, "vision_config": vision}


def choose_activation(quick_gelu, hf: dict | None, fmt: str, is_name: bool) -> tuple[bool, str]:
    """(quick_gelu, why), by the precedence in the module docstring."""
    if hf is not None:
        if quick_gelu is not None and quick_gelu != hf["quick_gelu"]:
            warnings.warn(f"quick_gelu={quick_gelu} ignored: config.json decides the activation")
        return hf["quick_gelu"], "from config.json"
    if quick_gelu is not None:
        return quick_gelu, "from the quick_gelu argument"
    if is_name or fmt == "torchscript":
        return True, "OpenAI weights were trained with it"
    return False, ("default for non-OpenAI checkpoints; pass quick_gelu=True for MetaCLIP or "
                   "OpenAI-derived weights")


# ----------------------------------------------------------------------------- public loaders
def _to_openai(raw: dict, path: str) -> tuple[dict, str]:
    """(OpenAI-named state dict, format name) from what read_checkpoint returned."""
    sd = unwrap(raw, path)
    fmt = "hf" if is_hf(sd) else "openai"
    sd = hf_to_openai(sd) if fmt == "hf" else sd
    sd = {k: v for k, v in sd.items() if k not in _TORCHSCRIPT_EXTRAS}
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ValueError(f"{path}: not a CLIP ViT checkpoint: missing {_listing(missing)}; "
                         f"its keys start {_listing(sorted(sd), 8)}")
    return sd, fmt


def load_state_dict(name_or_path: str = "ViT-B/16", download_root: str | None = None,
                    quick_gelu: bool | None = None) -> tuple[dict, dict]:
    """Any supported checkpoint -> (state dict with OpenAI keys, info).

    info: {"path", "format" ("torchscript" | "safetensors" | "pickle"), "keys" ("openai" | "hf"),
    "config" (a CLIPConfig with the activation and head counts), "activation" (why)}.
    The state dict is checked against a model of the inferred size; dtypes are kept as stored.
    """
    path = resolve(str(name_or_path), download_root)
    raw, fmt = read_checkpoint(path)
    sd, keys = _to_openai(raw, path)
    hf = hf_config(path) if keys == "hf" else None
    hf = hf_settings(hf, path) if hf is not None else None
    qg, why = choose_activation(quick_gelu, hf, fmt, name_or_path in _MODELS)
    heads = {k: hf[k] for k in ("vision_heads", "transformer_heads")} if hf else {}
    cfg = config_from_state_dict(sd, quick_gelu=qg, **heads)
    cfg = cfg if hf else _named_heads(cfg)
    check_state_dict(sd, cfg, path)
    print(f"clip_us: {name_or_path}: activation {'QuickGELU' if qg else 'GELU'} ({why})")
    return sd, {"path": path, "format": fmt, "keys": keys, "config": cfg, "activation": why}


def load_clip_state(weights: str, arch: str, quick_gelu=None):
    """(state dict, CLIPConfig or None) for `--weights NAME|PATH|none` and `--arch`.

    `none` is a random initialisation of `arch`: it is announced loudly, since any number it
    produces says nothing about CLIP.
    """
    if weights == "none":
        print(f"!!! --weights none: {arch} with RANDOM weights. Results are not CLIP's. !!!")
        # The same random backbone for every seed and script, without touching the global RNG
        # that the adapters and heads draw from.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model(config=arch, quick_gelu=quick_gelu)
        return model.state_dict(), model.config
    sd, info = load_state_dict(weights, quick_gelu=quick_gelu)
    return sd, info.get("config")


def build_clip(weights: str, arch: str, quick_gelu=None, cache=None):
    """A fresh fp32 CLIP for each call; `cache` (a dict) keeps the state dict between seeds."""
    key = (weights, arch, quick_gelu)
    if cache is None or key not in cache:
        state = load_clip_state(weights, arch, quick_gelu)
        if cache is not None:
            cache[key] = state
    else:
        state = cache[key]
    sd, config = state
    return build_model(sd, config=config)


def load(name_or_path: str = "ViT-B/16", device="cpu", download_root: str | None = None,
         quick_gelu: bool | None = None):
    """(model, preprocess): an fp32 CLIP in eval mode on `device`, and its image transform.

    `name_or_path`: a name from available_models(), an OpenAI .pt archive, a state dict or
    open_clip checkpoint, or a Hugging Face CLIPModel file/folder.
    """
    sd, info = load_state_dict(name_or_path, download_root, quick_gelu)
    model = build_model(sd, config=info["config"]).to(device)
    return model, Preprocess(model.visual.input_resolution)
