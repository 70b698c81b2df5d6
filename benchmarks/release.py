"""The release step's GGUF side on real Gemma 3 weights: every quantisation the seed ships, made and
checked.

    # ~5 minutes on 2 CPU cores (the model built on first use)
    .venv/bin/python benchmarks/release.py
    .venv/bin/python benchmarks/release.py --types F16,Q8_0  # fewer types

The model: gemma3-270m:base (Google's Gemma 3 270M, the preset's base; the release of a trained
student is the same code on other weights). stages.release.build makes the HF directory
(tokenizer.model written for llama.cpp), converts it with llama.cpp's converter (F16 and BF16
straight from it; every other type quantized from F16 by llama.cpp's quantizer) and compares each
file with transformers on held-out-style prompts (the first --probes ethics probes with their
reference answers): next-token argmax agreement and mean KL(transformers || GGUF) at every position,
tokenization checked. Prints per type: bytes, size relative to F16, agreement, KL; and the seconds
of conversion + quantization and of the comparisons; peak resident memory (MB) of this process and
of the converter's and quantizer's. One JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

# the seed's "12 quants, 3-bit to 16-bit"
TYPES = "F16,BF16,Q8_0,Q6_K,Q5_K_M,Q5_K_S,Q4_K_M,Q4_K_S,Q4_0,Q3_K_L,Q3_K_M,Q3_K_S"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--probes", type=int, default=8)
    args = ap.parse_args()

    import logging

    from cascade import gemma3_270m
    from cascade.config import compose
    from cascade.peakmem import PeakMemory
    from cascade.prompts import load_prompts
    from stages import release

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = compose(["+stage=4b", "models=gemma3-270m"])
    t0 = time.perf_counter()
    base = gemma3_270m.build_base(cfg)
    build_s = time.perf_counter() - t0
    probes = [{"messages": p.messages, "response": p.reference}
              for p in load_prompts(cfg.data["ethics"])
              if p.reference][: args.probes]
    types = args.types.split(",")
    with tempfile.TemporaryDirectory(prefix="cascade-release-bench-") as tmp, PeakMemory() as peak:
        t0 = time.perf_counter()
        # every type measured, none dropped
        rows, _ = release.build(tmp, str(base), "gemma3-270m", types, probes,
                                (0.99, 0.0, "mark"), 256, False)
        total = time.perf_counter() - t0
    f16 = next(r["bytes"] for r in rows if r["format"] == "GGUF F16")
    out = {"model": "gemma3-270m:base", "probes": len(probes), "positions": rows[1]["positions"],
           "model_build_s": round(build_s, 1), "convert_and_quantize_s": rows[0]["convert_seconds"],
           "release_build_s": round(total, 1), "safetensors_bytes": rows[0]["bytes"], "formats": {},
           # this process (the checks) and the converter and quantizer
           "peak_rss_mb": peak.megabytes()}
    for r in rows[1:]:
        t = r["format"].removeprefix("GGUF ")
        out["formats"][t] = {"bytes": r["bytes"], "size_vs_f16": round(r["bytes"] / f16, 3),
                             "agreement": round(r["agreement"], 4), "kl": float(f"{r['kl']:.3g}"),
                             "tokenization_same": r["tokenization_same"]}
        print(
            f"{t:8s} {r['bytes'] / 1e6:8.1f} MB  agreement {r['agreement']:.4f}  KL {r['kl']:.2e}"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
