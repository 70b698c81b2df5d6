"""GPU check of the generation step (one device run): vLLM replica actor vs bare vLLM, and TP
placement.

    # on a machine with >= 1 NVIDIA GPU, vllm==0.32.0 and CUDA torch
    python scripts/gpu_generation.py

1. benchmarks/generation.py --gpu --rounds 2: orchestrated vs bare vllm.LLM.generate on the same
   prompts (tiny preset teacher; engine start excluded); PASS when ratio_vs_bare_vllm >= 0.95.
2. With >= 2 GPUs: one replica with backend.vllm.tensor_parallel_size=2 (a STRICT_PACK placement
   group of two GPU bundles, vLLM's Ray executor inside it) generates a prompt set; PASS when every
   prompt is answered. Prints PASS/FAIL per check and one JSON object of figures on its last line;
   exits non-zero on any FAIL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    import torch

    figures: dict = {"gpus": torch.cuda.device_count()}
    ok = True
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/generation.py"), "--gpu",
                        "--prompts", "2048",
                        "--rounds", "2", "--max-new-tokens", "128"], capture_output=True, text=True)
    if r.returncode != 0:
        print("FAIL generation benchmark:", r.stderr[-3000:])
        ok = False
    else:
        bench = json.loads(r.stdout.strip().splitlines()[-1])
        figures["generation"] = bench
        passed = bench["ratio_vs_bare_vllm"] >= 0.95
        ok &= passed
        print(("PASS" if passed else "FAIL"), "orchestrated/bare vLLM throughput",
              bench["ratio_vs_bare_vllm"])
    if figures["gpus"] >= 2:
        run = ROOT / "outputs/gpu-tp2"
        r = subprocess.run([sys.executable, "-m", "cascade", "+stage=4b", "models=tiny",
                            "backend=vllm",
                            "backend.vllm.tensor_parallel_size=2",
                            "backend.vllm.gpu_memory_utilization=0.3",
                            "backend.vllm.enforce_eager=false", f"run_dir={run}",
                            "train.use_gpu=true"],
                           capture_output=True, text=True)
        passed = r.returncode == 0
        ok &= passed
        figures["tp2_rc"] = r.returncode
        print(("PASS" if passed else "FAIL"),
              "tensor_parallel_size=2 replica in a STRICT_PACK placement group")
    else:
        print("SKIP tensor_parallel_size=2: needs 2 GPUs, found", figures["gpus"])
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
