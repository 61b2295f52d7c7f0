"""Models from GGUF files (llama.cpp's format, how many pretrained models ship): `--model` may name a
``.gguf`` file, or a folder that holds one (and no config.json).

transformers (with the ``gguf`` package, the ``real`` extra) reads such a file into an ordinary fp32
model, dequantizing every tensor, and the file's own tokenizer and chat template come with it. That takes
a while (half a minute for a 135M model on 2 cores), and DeepSpeed's partitioned loading reads safetensors
folders, so the file is converted once into a Hugging Face folder in a cache and every stage loads that:

    $AFT_FAST_CACHE/gguf/<file stem>-<key>/   (default cache: $XDG_CACHE_HOME/aft_fast or ~/.cache/aft_fast)

The key hashes the file's path, size and modification time and the transformers version, so a changed
file or reader converts again. A lock file lets one process convert while the others (the ranks of a
launch, a second run) wait for it. The folder also holds ``gguf_source.json`` (where it came from).
An architecture that transformers cannot load from GGUF is refused by name before anything is read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from aft_fast.models.folders import check_hf_folder, save_hf_folder

SOURCE_FILE = "gguf_source.json"


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: `path` itself (a ``.gguf`` file), or the one ``.gguf`` file of a folder
    without config.json; None for anything else (e.g. a Hugging Face folder). A folder with several
    ``.gguf`` files is ambiguous: ValueError naming them."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ValueError(f"model: {path} holds several GGUF files ({names}); name one of them")
    return files[0] if files else None


def cache_root() -> Path:
    """Where converted models live: $AFT_FAST_CACHE, else $XDG_CACHE_HOME/aft_fast, else ~/.cache/aft_fast."""
    if os.environ.get("AFT_FAST_CACHE"):
        return Path(os.environ["AFT_FAST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aft_fast"


def cached_folder(file: str | Path) -> Path:
    """The Hugging Face folder that `file` converts to (it may not exist yet)."""
    file = Path(file).resolve()
    st = file.stat()
    key = f"{file}:{st.st_size}:{st.st_mtime_ns}:transformers-{transformers.__version__}"
    return cache_root() / "gguf" / f"{file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
_STRING, _ARRAY = 8, 9


def gguf_architecture(file: str | Path) -> str:
    """The ``general.architecture`` a GGUF file declares (e.g. "llama"), read from its header alone: the
    gguf package's reader parses every field (the whole vocabulary) first, seconds for nothing here."""
    with open(file, "rb") as f:

        def read(fmt: str) -> int:
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> bytes:
            return f.read(read("Q"))

        def skip(kind: int) -> None:
            if kind == _STRING:
                f.seek(read("Q"), 1)
            elif kind == _ARRAY:
                inner, count = read("I"), read("Q")
                if inner in _SCALAR_SIZES:
                    f.seek(_SCALAR_SIZES[inner] * count, 1)
                else:
                    for _ in range(count):
                        skip(inner)
            else:
                f.seek(_SCALAR_SIZES[kind], 1)

        if f.read(4) != b"GGUF" or read("I") < 2:
            raise ValueError(f"model: {file} is not a GGUF file (version 2 or later, little-endian)")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key, kind = string(), read("I")
            if key == b"general.architecture" and kind == _STRING:
                return string().decode()
            skip(kind)
    raise ValueError(f"model: {file} declares no general.architecture")


def check_gguf(file: str | Path) -> str:
    """The file's architecture; ValueError naming it when transformers cannot load it from GGUF (or the
    gguf package is missing)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError(
            f"model: {file} is a GGUF file; reading it needs pip install 'aft-fast[real]'"
        ) from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(file)
    # llama.cpp's names for what transformers calls qwen2_moe, gpt_oss, minimax_m2, ...
    names = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe")}
    if not names & set(GGUF_SUPPORTED_ARCHITECTURES):
        raise ValueError(
            f"model: {file} is a GGUF model of architecture {arch!r}, which transformers "
            f"{transformers.__version__} cannot load from GGUF (it loads "
            f"{', '.join(GGUF_SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def convert_gguf(file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize `file` into the Hugging Face folder `out_dir` (fp32 weights, tokenizer, chat template,
    gguf_source.json). `save_pretrained` refuses a model loaded from GGUF (it stays marked quantized), so
    the weights are copied into a plain model of the same config first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    file, out_dir = Path(file).resolve(), Path(out_dir)
    arch = check_gguf(file)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the folder holds plain fp32 weights
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.tie_weights()  # no_init_weights skips the tying too (tie_word_embeddings: one tensor, saved once)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    staging = out_dir.with_name(f".staging-{out_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    save_hf_folder(plain, tokenizer, staging)
    source = {
        "gguf_file": str(file),
        "size": file.stat().st_size,
        "architecture": arch,
        "model_class": type(plain).__name__,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "transformers": transformers.__version__,
    }
    if not _complete(staging):  # transformers' save_pretrained writes nothing on ranks > 0 of a process group
        raise RuntimeError(
            f"model: converting {file} wrote no weights to {staging}; convert on rank 0 of a process group"
        )
    (staging / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)  # a folder without SOURCE_FILE is no finished conversion
    os.replace(staging, out_dir)
    return out_dir


def _complete(folder: Path) -> bool:
    try:
        check_hf_folder(folder)
    except FileNotFoundError:
        return False
    return True


def gguf_to_folder(file: str | Path, log: Callable[[str], None] = print) -> Path:
    """The cached Hugging Face folder of `file`, converting it first if no process has yet (under a lock,
    so concurrent callers convert once). `log` gets one line naming the cache folder."""
    file = Path(file)
    folder = cached_folder(file)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{folder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (folder / SOURCE_FILE).is_file() and _complete(folder):
            log(f"model: {file} -> {folder} (the cached conversion)")
            return folder
        log(f"model: dequantizing {file} into {folder} (once; later runs reuse it)")
        convert_gguf(file, folder)
    return folder
