"""Scoring of cascade's offline lm-evaluation-harness tasks (loaded by the harness from this
directory)."""

from __future__ import annotations

import re


def _rouge_l(candidate: str, reference: str) -> float:
    from cascade.metrics import rouge_l  # the same measure as the stage's own evaluation

    return rouge_l(candidate, reference)


def probes_results(doc: dict, results: list[str]) -> dict:
    answer = results[0].strip()
    return {"rouge_l": _rouge_l(answer, doc["reference"]), "nonempty": float(bool(answer))}


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


CHECKS = {"lowercase": lambda t, a: t == t.lower() and any(c.isalpha() for c in t),
          "uppercase": lambda t, a: t == t.upper() and any(c.isalpha() for c in t),
          "max_words": lambda t, a: 0 < len(_words(t)) < a["n"], "min_words": lambda t,
          a: len(_words(t)) >= a["n"], "include": lambda t,
          a: a["word"].lower() in (w.lower() for w in _words(t)), "exclude": lambda t,
          a: a["word"].lower() not in (w.lower() for w in _words(t)), "no_commas": lambda t,
          a: "," not in t and bool(t), "ends_with": lambda t, a: t.rstrip().endswith(a["text"]),
          "starts_with": lambda t, a: t.lstrip().startswith(a["text"]), "quoted": lambda t,
          a: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"'}


def format_results(doc: dict, results: list[str]) -> dict:
    answer = results[0].strip()
    passed = [bool(CHECKS[name](answer, args)) for name, args in doc["checks"]]
    return {"prompt_level_acc": float(all(passed)), "inst_level_acc": sum(passed) / len(passed)}
