"""Load models and tokenizers from a local folder, a hub id or a GGUF file, with errors a user can act on.

Never loads pickled weights (safetensors only) and never runs remote code unless the recipe
says `trust_remote_code: true`. A `.gguf` file (llama.cpp's format) is read as the safetensors
folder it converts to once (models/gguf.py). Every load goes through `pretrained`, so a missing
folder, a folder of the wrong kind and a broken weights file are each one line naming the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_source(name_or_path: str | Path, trust_remote_code: bool = False) -> str:
    """What `from_pretrained` reads: a folder or hub id as it is; a `.gguf` file as the safetensors
    folder it is converted to once (models/gguf.py)."""
    text = str(name_or_path)
    if text.endswith(".gguf"):
        from .gguf import gguf_folder

        return str(gguf_folder(text, trust_remote_code))
    _check_local(text)
    return text


def pretrained(auto_class: Any, name_or_path: str | Path, what: str, **kwargs) -> Any:
    """`auto_class.from_pretrained` with one-line errors ("<path>: cannot load <what> (<reason>)"),
    safetensors only."""
    src = model_source(name_or_path, kwargs.get("trust_remote_code", False))
    if auto_class is not AutoTokenizer and auto_class is not AutoConfig:
        kwargs.setdefault("use_safetensors", True)
    try:
        return auto_class.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise UserError(f"{name_or_path}: cannot load {what} ({_first_line(err)})") from None


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = pretrained(AutoTokenizer, name_or_path, "a tokenizer", trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # base models often ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def check_causal_lm(name_or_path: str | Path, trust_remote_code: bool = False) -> None:
    """Cheap pre-flight (config only): the folder exists and holds a causal LM.

    A reward/classifier folder of a causal-LM family (e.g. MistralForSequenceClassification)
    would otherwise load as a causal LM with a *random* LM head, silently; its saved
    architecture says what it is.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    src = str(name_or_path)
    config = pretrained(AutoConfig, src, "a causal language model", trust_remote_code=trust_remote_code)
    if trust_remote_code:
        return
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{src}: not a causal language model (model_type '{config.model_type}')")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UserError(f"{src}: not a causal language model (it is a {archs[0]})")


def load_causal_lm(name_or_path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """A causal LM in eval mode; `UserError` when the folder is missing or is not a causal LM."""
    check_causal_lm(name_or_path, trust_remote_code)
    model = pretrained(AutoModelForCausalLM, name_or_path, "a causal language model", dtype=DTYPES[dtype],
                       trust_remote_code=trust_remote_code)
    return model.eval()


def activation_checkpointing(model: Any) -> Any:
    """Recompute each layer's activations in the backward instead of keeping them (trained models of
    a large base: `model.gradient_checkpointing`). transformers 5.x calls it activation
    checkpointing (the old name warns); older versions have only the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # generation turns it back on per call
    return model


def _check_local(name_or_path: str | Path) -> None:
    """A path that looks local but does not exist is a typo, not a hub id: say so plainly."""
    text = str(name_or_path)
    looks_local = text.startswith((".", "/", "~")) or Path(text).exists() or text.count("/") != 1
    if looks_local and not Path(text).expanduser().is_dir():
        hint = "" if "/" in text else " (a hub id is written organisation/name, e.g. openai-community/gpt2)"
        raise UserError(f"{text}: model folder not found{hint}")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
