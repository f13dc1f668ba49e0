"""The seed paper's layer-wise probe: how much probability each layer puts on bad words (logit lens).

For a red-team prompt, the residual stream after layer l is read out as if it were the last layer:
through the model's final norm and its LM head, then a softmax. Summing that distribution over a
bad-word vocabulary gives P_l(bad next token). A model that was merely taught to *not say* bad
words late in the network still has them high in the middle layers; the paper's claim is that
RLHF from the base lowers them throughout. Layer 0 is the embedding output; the last layer is the
model's real next-token distribution (its own logits), whatever its `hidden_states` convention.
"""

from __future__ import annotations

import inspect
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..data.chat_format import prompt_ids
from ..errors import UserError
from ..io import text_lines
from ..rollout.hf_generate import left_pad

_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f")


def shipped_badwords() -> Path:
    return Path(str(resources.files("direct_rlhf") / "eval" / "badwords.txt"))


def read_badwords(path: str | Path | None = None) -> list[str]:
    """Words, one a line, '#' comments; the shipped list when `path` is None."""
    path = Path(path) if path is not None else shipped_badwords()
    if not path.is_file():
        raise UserError(f"{path}: bad-word list not found (eval.badwords)")
    lines = [line for _, line in text_lines(path)]
    words = list(dict.fromkeys(w for w in (ln.split("#", 1)[0].strip() for ln in lines) if w))
    if not words:
        raise UserError(f"{path}: the bad-word list is empty")
    return words


def badword_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """Ids of every single-token variant of each word: ("w", " w", "W", " W").

    Only whole-word tokens count: a word that splits into pieces ("id" + "iot") would otherwise
    count its first piece, which starts many harmless words. Returns (sorted unique ids, words
    with no single-token variant) so the report can say what the probe cannot see.
    """
    ids: set[int] = set()
    missing = []
    for word in words:
        found = False
        for variant in {word, " " + word, word.capitalize(), " " + word.capitalize()}:
            toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(toks) == 1:
                ids.add(int(toks[0]))
                found = True
        if not found:
            missing.append(word)
    return sorted(ids), missing


def _final_norm(model: Any) -> torch.nn.Module:
    """The final norm of a decoder-only model (Mistral/Llama/Qwen `model.norm`, GPT-2 `ln_f`, ...)."""
    for root in (getattr(model, "base_model", None), getattr(model, "model", None), model):
        for name in _NORM_NAMES:
            mod = getattr(root, name, None) if root is not None else None
            if isinstance(mod, torch.nn.Module):
                return mod
    raise UserError(f"logit lens: cannot find the final norm of {type(model).__name__} "
                    f"(looked for {', '.join(_NORM_NAMES)})")


@torch.no_grad()
def badword_prob_by_layer(model: Any, tokenizer: Any, prompts: Sequence[str], token_ids: Sequence[int],
                          batch_size: int = 32, progress: str | None = None) -> list[list[float]]:
    """P_l(next token in `token_ids`) at the last prompt position; size = (n_prompts, n_layers + 1).

    `progress`: a progress-bar label, or None for no bar.
    """
    if not token_ids:
        raise UserError("logit lens: none of the bad words is a single token for this tokenizer")
    head = model.get_output_embeddings()
    norm = _final_norm(model)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=model.device)
    # Only the last position is read: skip the (B, T, V) logits where the model allows it.
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=progress or "", disable=progress is None, leave=False):
            # the prompts laid out as generation lays them out (BOS where the tokenizer adds one)
            input_ids, mask = left_pad(prompt_ids(tokenizer, prompts[i:i + batch_size]), tokenizer.pad_token_id)
            enc = {"input_ids": input_ids.to(model.device), "attention_mask": mask.to(model.device)}
            position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
            res = model(**enc, position_ids=position_ids, output_hidden_states=True, use_cache=False, **extra)
            hidden = res.hidden_states  # L + 1 tensors, each size = (B, T, H)
            # Layers 0..L-1: residual stream -> final norm -> head. Layer L: the model's own logits
            # (some implementations return it already normed, others not: the logits are unambiguous).
            logits = [head(norm(h[:, -1])) for h in hidden[:-1]] + [res.logits[:, -1]]  # each (B, V)
            probs = torch.stack([torch.softmax(lg.float(), dim=-1)[:, ids].sum(-1) for lg in logits], dim=1)
            out.extend(probs.cpu().tolist())  # size = (B, L + 1)
    finally:
        model.train(was_training)
    return out


def mean_by_layer(per_prompt: Sequence[Sequence[float]]) -> list[float]:
    t = torch.tensor(per_prompt, dtype=torch.float64)  # size = (N, L + 1)
    return t.mean(0).tolist()
