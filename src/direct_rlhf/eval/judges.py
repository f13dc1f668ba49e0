"""Pairwise judges for the conversation win-rate: the reward model, and an optional LLM over HTTP.

A scalar reward model scores each response on its own, so "both orders" changes nothing for it:
model A beats model B on a prompt when r(A) > r(B) by more than `eps` (in units of the reward's
training-set std), and it is a tie otherwise; ties count half. An LLM judge *does* see both
responses side by side and is known to prefer whichever comes first, so it is asked twice, in
both orders, and the two verdicts are averaged (one win and one loss is a tie).
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError
from .intervals import CLUSTER_BOOTSTRAP, cluster_bootstrap_mean


class RewardJudge:
    """Scores responses with a reward model folder; each distinct (prompt, response) is scored once.

    Scores are normalised with the reward model's training statistics, so `eps` means the same
    thing whatever scale the reward model learned. Identical texts get bit-identical scores (the
    cache), so a model compared with itself ties exactly instead of differing by padding noise.
    """

    def __init__(self, path: str | Path, batch_size: int = 32, device: str = "cpu") -> None:
        from ..models.reward_model import RewardScorer

        self.path = str(path)
        self.scorer = RewardScorer(path, device=device, batch_size=batch_size)
        self._cache: dict[tuple[str, str], float] = {}

    def measure_stats(self, prompts: Sequence[str], responses: Sequence[str], source: str) -> None:
        """A reward model brought without reward_stats.json: its normalisation statistics are
        measured on these responses (the reference model's), before anything is normalised."""
        if self.scorer.mean is None:
            self.scorer.set_stats(self.scorer.score(list(prompts), list(responses)), source)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        keys = list(zip(prompts, responses))
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            raw = self.scorer.score([p for p, _ in todo], [r for _, r in todo])
            for key, val in zip(todo, self.scorer.normalise(raw).tolist()):
                self._cache[key] = float(val)
        return [self._cache[k] for k in keys]


def outcomes_from_scores(a: Sequence[float], b: Sequence[float], eps: float) -> np.ndarray:
    """Per comparison: 1 when a wins, 0 when b wins, 0.5 for a tie (|r(a) - r(b)| <= eps)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.where(np.abs(diff) <= eps, 0.5, (diff > 0).astype(np.float64))


def summarise(outcomes: Sequence[float], prompt_ids: Sequence[int], n_boot: int = 2000, seed: int = 0) -> dict:
    """Win-rate (ties = 0.5) with a cluster-bootstrap 95% interval, plus the win/tie/loss counts."""
    o = np.asarray(outcomes, dtype=np.float64)
    return {"win_rate": float(o.mean()) if o.size else None,
            "ci95": list(cluster_bootstrap_mean(o, prompt_ids, n_boot, seed)),
            "wins": int((o > 0.5).sum()), "ties": int((o == 0.5).sum()), "losses": int((o < 0.5).sum()),
            "n": int(o.size), "interval": CLUSTER_BOOTSTRAP}


# --------------------------------------------------------------------------------------------------
# An OpenAI-compatible chat endpoint as judge (off unless eval.judge_url is set)

JUDGE_SYSTEM = "You are a careful, impartial judge of AI assistant responses."
JUDGE_TEMPLATE = (
    "Here is a conversation between a user and an AI assistant, and two candidate responses for the "
    "assistant's next turn.\n\nConversation:{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Which response is better: more helpful, more correct and harmless? Answer with exactly one "
    "word: A, B, or TIE."
)
_TIE = re.compile(r"\btie\b", re.IGNORECASE)
_LETTER = re.compile(r"\b([AB])\b")  # upper case only: the article "a" is not a verdict


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'TIE' from a judge's answer, None when it names no single verdict. "It's a
    tie" is a tie (upper-casing the answer first read its article as A); "A or B" is no verdict."""
    if _TIE.search(text):
        return "TIE"
    letters = set(_LETTER.findall(text))
    return letters.pop() if len(letters) == 1 else None


class HttpJudge:
    """Asks an OpenAI-compatible `/chat/completions` endpoint which of two responses is better."""

    def __init__(self, url: str, model: str | None, timeout_s: float = 30.0) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model or "default"
        self.timeout_s = timeout_s
        self.unparsed = 0

    def _ask(self, content: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 4,
                           "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                                        {"role": "user", "content": content}]}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        hint = "start the judge server or set eval.judge_url=null"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise UserError(f"judge endpoint {self.url} answered HTTP {err.code} ({err.reason}); "
                            f"check eval.judge_url and eval.judge_model") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", None) or err or type(err).__name__
            raise UserError(f"judge endpoint {self.url} unreachable ({reason}); {hint}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"judge endpoint {self.url} did not answer JSON; is it OpenAI-compatible?") from None
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise UserError(f"judge endpoint {self.url}: no choices[0].message.content in its answer; "
                            f"is it OpenAI-compatible?") from None

    def verdict(self, prompt: str, a: str, b: str) -> str:
        """'A', 'B' or 'TIE' (an answer we cannot parse counts as a tie, and is counted)."""
        text = self._ask(JUDGE_TEMPLATE.format(prompt=prompt, a=a.strip() or "(empty)", b=b.strip() or "(empty)"))
        verdict = parse_verdict(text)
        if verdict is None:
            self.unparsed += 1
            return "TIE"
        return verdict

    def compare(self, prompt: str, a: str, b: str) -> float:
        """Score of `a` against `b` in [0, 1], judged in both orders: 1 win, 0.5 tie, 0 loss."""
        first = {"A": 1.0, "TIE": 0.5, "B": 0.0}[self.verdict(prompt, a, b)]
        second = {"B": 1.0, "TIE": 0.5, "A": 0.0}[self.verdict(prompt, b, a)]
        return (first + second) / 2

    def check(self) -> None:
        """Fail fast (before minutes of generation) when the endpoint is not there."""
        self._ask("Reply with the single word TIE.")
