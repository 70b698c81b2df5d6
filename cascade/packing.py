"""Sequence packing for training: minimum-slack bins, and batches whose examples never see each
other.

Each packed row holds whole examples; position ids restart at 0 for every example, and the attention
mask is block-diagonal causal (sliding-window layers also limited to their window), passed per layer
type as Gemma3 expects, so a packed row computes exactly what its examples would compute alone
(tests/test_packing.py). Labels keep the prompt masking of cascade.chat.encode_example; an example's
first label is a masked prompt token, so no loss crosses a boundary.
"""

from __future__ import annotations

from typing import Any

from cascade.chat import IGNORE_INDEX


def pack(lengths: list[int], capacity: int, chunk: int = 2048) -> list[list[int]]:
    """Bins of example indices, each summing to <= capacity, by minimum bin slack (Gupta & Ho's
    MBS'): each bin takes the longest example left plus the subset of the others that fills it
    closest to capacity.

    The subset is an exact subset-sum (bitsets as Python ints), so bins close at zero slack wherever
    the lengths allow; this reaches the ceil(total / capacity) lower bound where best-fit decreasing
    opens extra bins (the project's 120 examples at 256 tokens: 29 bins, BFD 30). A bin costs O(n)
    bitset operations, so examples are packed in consecutive chunks of `chunk` (each wastes at most
    its last bin's slack).
    """
    bins: list[list[int]] = []
    for start in range(0, len(lengths), chunk):
        bins += _min_slack(lengths, range(start, min(len(lengths), start + chunk)), capacity)
    return bins


def _min_slack(lengths: list[int], idx: range, capacity: int) -> list[list[int]]:
    size = {i: min(lengths[i], capacity) for i in idx}
    left = sorted(idx, key=lambda i: (-size[i], i))
    bins = []
    while left:
        first, rest = left[0], left[1:]
        mask = (1 << (capacity - size[first] + 1)) - 1  # sums that fit beside the longest
        reach = [1]  # reach[j]: bit s set when some subset of rest[:j] sums to s
        for i in rest:
            reach.append((reach[-1] | (reach[-1] << size[i])) & mask)
        s, chosen = reach[-1].bit_length() - 1, [first]
        for j in range(len(rest), 0, -1):
            # walk back: rest[j-1] is needed when s is unreachable without it
            if not (reach[j - 1] >> s) & 1:
                chosen.append(rest[j - 1])
                s -= size[rest[j - 1]]
        bins.append(chosen)
        taken = set(chosen)
        left = [i for i in rest if i not in taken]
    return bins


def collate_packed(rows: list[list[dict]], pad_id: int, layer_types: list[str] | None,
                   window: int | None, device: Any = "cpu") -> dict[str, Any]:
    """Model inputs for rows of examples: input_ids, labels, position_ids and per-layer-type 4D
    boolean masks."""
    import torch

    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    # the teachers' top-k ids and log-probs at each position (logit distillation)
    kd = "kd_ids" in rows[0][0]
    if kd:
        k = len(rows[0][0]["kd_ids"][0])
        kd_ids = torch.zeros((n, width, k), dtype=torch.long)
        kd_lp = torch.zeros((n, width, k), dtype=torch.float32)
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row):
            m = len(e["input_ids"])
            ids[r, at : at + m] = torch.tensor(e["input_ids"])
            labels[r, at : at + m] = torch.tensor(e["labels"])
            pos[r, at : at + m] = torch.arange(m)
            seg[r, at : at + m] = s
            if kd:
                kd_ids[r, at : at + m] = torch.tensor(e["kd_ids"], dtype=torch.long)
                kd_lp[r, at : at + m] = torch.tensor(e["kd_lp"], dtype=torch.float32)
            at += m
    q = torch.arange(width)[:, None]
    kk = torch.arange(width)[None, :]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    # padding attends to itself: no empty softmax rows
    eye = torch.eye(width, dtype=torch.bool)[None]
    full = ((same & (kk <= q)[None]) | eye)[:, None]
    masks = {"full_attention": full}
    if window:
        masks["sliding_attention"] = ((same & (kk <= q)[None] & ((q - kk) < window)[None]) | eye)[
            :, None
        ]
    types = set(layer_types or ["full_attention"])
    mask = ({t: masks[t].to(device) for t in types} if len(types) > 1
            else masks[types.pop()].to(device))
    out = {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device),
           "attention_mask": mask, "real_tokens": int((seg >= 0).sum()), "slots": n * width}
    if kd:
        out.update(kd_ids=kd_ids.to(device), kd_lp=kd_lp.to(device))
    return out


class DataOrder:
    """Unit index for a global position: epoch-wise permutations drawn from the seed. Optimizer step
    s, micro-step m, global row j reads unit order[(s * accum + m) * B + j] (B the global
    micro-batch): the same for any worker count."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.perms = n, seed, {}

    def __getitem__(self, pos: int) -> int:
        import torch

        e = pos // self.n
        if e not in self.perms:
            self.perms[e] = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + e)
            ).tolist()
        return self.perms[e][pos % self.n]
