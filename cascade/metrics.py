"""Text measures shared by the stage's evaluation (stages/evaluate.py) and the offline
lm-evaluation-harness tasks (data/harness/utils.py): one definition, so both report the same number.
"""

from __future__ import annotations


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace words: the longest common subsequence's share of both
    texts."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))
