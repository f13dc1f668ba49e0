"""A GGUF file (llama.cpp's format) as a model folder: `model.base=path/to/model.gguf` works.

transformers reads GGUF and dequantises it, which for every load re-parses the file (config,
tokenizer and weights separately; 20 s for a 135M model on a laptop CPU). So the file is converted
once into an ordinary safetensors folder (float32 weights, the tokenizer, the config), kept in a
cache keyed by the file's contents, and every role loads that folder. The conversion is atomic:
processes started together convert concurrently and the first rename wins.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("direct_rlhf")


def cache_root() -> Path:
    """$DIRECT_RLHF_CACHE, else ~/.cache/direct-rlhf (XDG_CACHE_HOME respected)."""
    if os.environ.get("DIRECT_RLHF_CACHE"):
        return Path(os.environ["DIRECT_RLHF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "direct-rlhf"


def gguf_folder(path: str | Path, trust_remote_code: bool = False) -> Path:
    """The safetensors folder converted from the GGUF file `path` (converted on first use)."""
    from ..artifacts import file_digest

    src = Path(path).expanduser()
    if not src.is_file():
        raise UserError(f"{path}: GGUF file not found")
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError:
        raise UserError(f"{path}: reading a GGUF file needs the gguf package (pip install gguf)") from None
    out = cache_root() / "gguf" / f"{src.stem}-{file_digest(src)}"
    if (out / "config.json").is_file():
        return out
    log.info("%s: converting to a safetensors folder in %s (once)", path, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _convert(src, tmp, trust_remote_code)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(src: Path, out: Path, trust_remote_code: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": src.name, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        text = str(err).strip()
        raise UserError(f"{src}: cannot read it as a GGUF model ({text.splitlines()[0] if text else type(err).__name__})") from None
    # dequantised on load: plain tensors, but transformers still marks the model quantised and refuses to save it
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
