"""Which rows share a forward pass: PPO's micro-batches.

The rows of a mini-batch, sorted longest first, are cut into consecutive groups of at most
`ppo.micro_batch_size` rows and, when `ppo.micro_batch_tokens` is set, at most that many token
positions: what the models actually process, which is the rows' real tokens when the group is
packed end to end (`packed_rows`) and rows x (longest prompt + longest response) when it is
padded. A budget of positions bounds a pass's activation memory whatever the lengths are, so the
short rows of a spread batch share fewer, fuller passes while the long ones go in small groups;
a row longer than the budget goes alone. Gradients accumulate over the groups, each weighted by
its share of the mini-batch's tokens, so the update does not depend on how the rows were cut.
"""

from __future__ import annotations


def packs(width: int, pack_rows: bool, pack_limit: int | None) -> bool:
    """Whether a group of rows this wide (longest prompt + longest response) runs packed: with
    ppo.pack_rows, unless it is wider than the models' sliding window (`pack_limit`; None: none)."""
    return pack_rows and (pack_limit is None or width <= pack_limit)


def length_groups(prompt_len: list[int], resp_len: list[int], max_rows: int, max_tokens: int = 0,
                  pack_rows: bool = False, pack_limit: int | None = None) -> list[slice]:
    """Consecutive groups of rows already sorted by length; `max_tokens=0` counts rows only. A
    group's positions are counted as `packs` says it will run."""
    groups, start, n = [], 0, len(prompt_len)
    while start < n:
        end, width_p, width_r = start + 1, prompt_len[start], max(1, resp_len[start])
        real = prompt_len[start] + resp_len[start]      # the group's real tokens
        while end < n and end - start < max_rows:
            p, r = max(width_p, prompt_len[end]), max(width_r, resp_len[end])
            t = real + prompt_len[end] + resp_len[end]
            positions = t if packs(p + r, pack_rows, pack_limit) else (end - start + 1) * (p + r)
            if max_tokens and positions > max_tokens:
                break
            end, width_p, width_r, real = end + 1, p, r, t
        groups.append(slice(start, end))
        start = end
    return groups
