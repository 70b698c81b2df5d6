"""Sequence packing for training: best-fit decreasing bins, and batches whose examples never see each other.

Each packed row holds whole examples; position ids restart at 0 for every example, and the attention mask is
block-diagonal causal (sliding-window layers also limited to their window), passed per layer type as Gemma3
expects, so a packed row computes exactly what its examples would compute alone (tests/test_packing.py).
Labels keep the prompt masking of cascade.chat.encode_example; an example's first label is a masked prompt
token, so no loss crosses a boundary.
"""

from __future__ import annotations

from typing import Any

from cascade.chat import IGNORE_INDEX


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each summing to <= capacity: longest first, each into the fullest bin it fits."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = min(lengths[i], capacity)
        fits = [b for b in range(len(bins)) if room[b] >= n]
        if fits:
            b = min(fits, key=lambda b: room[b])
            bins[b].append(i)
            room[b] -= n
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def collate_packed(rows: list[list[dict]], pad_id: int, layer_types: list[str] | None, window: int | None,
                   device: Any = "cpu") -> dict[str, Any]:
    """Model inputs for rows of examples: input_ids, labels, position_ids and per-layer-type 4D boolean masks."""
    import torch

    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    seg = torch.full((n, width), -1, dtype=torch.long)
    kd = "kd_ids" in rows[0][0]  # the teachers' top-k ids and log-probs at each position (logit distillation)
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
    eye = torch.eye(width, dtype=torch.bool)[None]  # padding attends to itself: no empty softmax rows
    full = ((same & (kk <= q)[None]) | eye)[:, None]
    masks = {"full_attention": full}
    if window:
        masks["sliding_attention"] = ((same & (kk <= q)[None] & ((q - kk) < window)[None]) | eye)[:, None]
    types = set(layer_types or ["full_attention"])
    mask = {t: masks[t].to(device) for t in types} if len(types) > 1 else masks[types.pop()].to(device)
    out = {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": pos.to(device),
           "attention_mask": mask, "real_tokens": int((seg >= 0).sum()), "slots": n * width}
    if kd:
        out.update(kd_ids=kd_ids.to(device), kd_lp=kd_lp.to(device))
    return out
