"""The teachers' top-k log-probabilities: their file format (written by generation, read by
training).

    python -m cascade +stage=4b models=tiny generation.logprobs=8 curriculum.0.kind=distill

A shard's log-probabilities are one compressed .npz beside its JSONL (shard-NNNNN.logprobs.npz):
`token_ids` int32 [T, k] (the top-k token ids at each response position of every record,
concatenated), `logprobs` float16 [T, k] (their log-probabilities) and `sampled` int32 [T] (the
tokens the teacher sampled). Each record keeps {file, offset, length} into it instead of the lists;
curation turns `file` into the run-directory path. The loss against them is
cascade.modeling.response_nll's second sum.
"""

from __future__ import annotations

import io
from typing import Any, Callable

LISTS = ("top_ids", "top_logprobs", "token_ids")  # a completion's fields that go to the .npz


def file_name(shard: int) -> str:
    return f"shard-{shard:05d}.logprobs.npz"


def pack(recs: list[dict], shard: int) -> bytes:
    """Move the lists of a shard's records into one .npz (returned); each record gets its {file,
    offset, length}."""
    import numpy as np

    ids, lps, sampled, offset = [], [], [], 0
    for r in recs:
        top_ids, top_lps = r.pop("top_ids") or [], r.pop("top_logprobs") or []
        tokens = r.pop("token_ids", None) or []
        r["logprobs"] = {"file": file_name(shard), "offset": offset, "length": len(top_ids)}
        ids += top_ids
        lps += top_lps
        sampled += tokens[: len(top_ids)]
        offset += len(top_ids)
    buf = io.BytesIO()
    np.savez_compressed(buf, token_ids=np.asarray(ids, dtype=np.int32),
                        logprobs=np.asarray(lps, dtype=np.float16),
                        sampled=np.asarray(sampled, dtype=np.int32))
    return buf.getvalue()


class Reader:
    """Reads records' log-probabilities, each .npz once; `read_bytes(path)` fetches a file
    (RunDir.read_bytes)."""

    def __init__(self, read_bytes: Callable[[str], bytes]) -> None:
        self.read_bytes, self.files = read_bytes, {}

    def __call__(self, ref: dict) -> tuple[Any, Any, Any]:
        """(sampled tokens [T], top-k ids [T, k], top-k log-probs [T, k] float32) of one record's
        {file, offset, length}, as numpy arrays."""
        import numpy as np

        if ref["file"] not in self.files:
            self.files[ref["file"]] = dict(np.load(io.BytesIO(self.read_bytes(ref["file"]))))
        z, at = self.files[ref["file"]], slice(ref["offset"], ref["offset"] + ref["length"])
        return z["sampled"][at], z["token_ids"][at], z["logprobs"][at].astype(np.float32)


def encode_distill(tok: Any, rec: dict, max_len: int, read: Reader) -> dict:
    """A record as the teacher generated it: prompt (masked) + the sampled tokens, and at each
    response position the teacher's top-k token ids and log-probabilities."""
    from cascade.chat import IGNORE_INDEX, render_prompt

    sampled, top_ids, top_lps = read(rec["logprobs"])
    prompt = tok(render_prompt(tok, rec["messages"]), add_special_tokens=False)["input_ids"]
    response, k, n = sampled.tolist(), top_ids.shape[1], len(prompt)
    return {"input_ids": (prompt + response)[:max_len],
            "labels": ([IGNORE_INDEX] * n + response)[:max_len],
            "kd_ids": ([[0] * k] * n + top_ids.tolist())[:max_len],
            "kd_lp": ([[0.0] * k] * n + top_lps.tolist())[:max_len]}
