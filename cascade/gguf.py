"""GGUF, in one place: llama.cpp's types, its tools, the release's file names, a file checked
against transformers.

Used by the config (type names), the driver (tools present before Ray starts), the release step
(convert, quantize, compare), `serve` (which file to serve) and the planner (bits per weight). GGUF
files come from llama.cpp's own converter (convert_hf_to_gguf.py, vendored in the llama-cpp-python
sdist that scripts/setup.sh unpacks) and its own quantizer (llama_model_quantize through
llama-cpp-python), never from a writer of ours.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from cascade.validate import ConfigError

log = logging.getLogger(__name__)


class ReleaseError(RuntimeError):
    """A released file that would not mean what the student means (stages/release.py); nothing is
    committed."""


# made by the converter; the others by the quantizer from the first of these
FLOAT_TYPES = ("F32", "F16", "BF16")
EXACT_TYPES = ("F32", "F16")  # held to release.min_agreement
# bits per weight of each type, for the planner's file sizes (llama.cpp's own table, rounded)
BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54,
        "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.55, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5}


def valid_name(t: object) -> bool:
    """What a llama.cpp type name looks like (F16, Q8_0, Q4_K_M); check_tools asks llama.cpp which
    exist."""
    return bool(re.fullmatch(r"[A-Z0-9_]+", str(t)))


def file_name(release: str, gguf_type: str) -> str:
    """A release's GGUF file: <family>-<stage>-<TYPE>.gguf, under <stage>/release/gguf/."""
    return f"{release}-{gguf_type}.gguf"


def llama_cpp_dir() -> Path:
    """llama.cpp's conversion scripts (convert_hf_to_gguf.py, conversion/, gguf-py/) as
    scripts/setup.sh unpacks them beside the venv; CASCADE_LLAMA_CPP names another copy."""
    return Path(os.environ.get("CASCADE_LLAMA_CPP")
                or Path(sys.prefix, "share", "cascade", "llama.cpp"))


def check_tools(types: list[str]) -> None:
    """Before Ray starts: a release needs llama-cpp-python and llama.cpp's converter
    (scripts/setup.sh installs both); every GGUF type named must be one llama.cpp knows."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ConfigError(f"release.enabled needs llama-cpp-python ({e}); scripts/setup.sh builds "
                          "it once") from e
    if not (llama_cpp_dir() / "convert_hf_to_gguf.py").is_file():
        raise ConfigError(f"release.enabled: llama.cpp's converter is not at {llama_cpp_dir()} "
                          "(scripts/setup.sh unpacks it; CASCADE_LLAMA_CPP names another copy)")
    known = {n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp)
             if n.startswith("LLAMA_FTYPE_MOSTLY_")}
    for t in types:
        if t not in known and t != "F32":
            raise ConfigError(f"release.gguf: {t!r} is not a llama.cpp type; valid: F32, "
                              f"{', '.join(sorted(known))}")


def llama_cpp_mismatches(config: dict) -> list[str]:
    """What llama.cpp's Gemma 3 graph assumes that this config does not say: queries scaled by
    1/sqrt(head_dim) (1/sqrt(hidden/heads) at 62 layers, the 27B) and every sixth layer attending
    fully. The converter writes neither, so a model that differs converts without an error and
    answers differently."""
    if config.get("model_type") not in ("gemma3_text", "gemma3"):
        return []
    c = config.get("text_config", config)
    out = []
    layers, head_dim = c["num_hidden_layers"], c.get("head_dim", 256)
    want = c["hidden_size"] // c["num_attention_heads"] if layers == 62 else head_dim
    if "query_pre_attn_scalar" not in c:
        out.append("config.json has no query_pre_attn_scalar (transformers would use its default, "
                   "256)")
    elif c["query_pre_attn_scalar"] != want:
        out.append(f"query_pre_attn_scalar is {c['query_pre_attn_scalar']}; llama.cpp scales "
                   f"queries by 1/sqrt({want})")
    pattern = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
    if c.get("layer_types") and c["layer_types"] != pattern and c.get("sliding_window"):
        out.append("layer_types is not Gemma 3's five sliding layers to one full, which llama.cpp "
                   "assumes")
    return out


def quiet_llama_cpp() -> None:
    """llama.cpp logs every tensor it loads or quantizes; keep its warnings and errors only."""
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def keep_errors(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())

    global _LOG_CALLBACK
    _LOG_CALLBACK = keep_errors  # ctypes needs the callback kept alive
    llama_cpp.llama_log_set(keep_errors, ctypes.c_void_p())


_LOG_CALLBACK = None


def convert(hf: Path, out: Path, outtype: str) -> None:
    """llama.cpp's converter, with its own gguf-py (PyPI's gguf lags behind the script)."""
    tools = llama_cpp_dir()
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(tools / "gguf-py"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(tools / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(out),
           "--outtype", outtype.lower()]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ReleaseError(f"convert_hf_to_gguf.py failed ({done.returncode}): "
                           f"{done.stderr[-2000:]}")


def quantize(src: Path, dst: Path, gguf_type: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type}")
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise ReleaseError(f"llama.cpp could not quantize {src.name} to {gguf_type}")


def compare_gguf(path: Path, reference: list[dict]) -> dict:
    """llama.cpp's next-token distributions against transformers' on the same token ids."""
    import llama_cpp
    import numpy as np

    n_ctx = max(len(r["ids"]) for r in reference) + 8
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                          logits_all=True,
                          n_threads=max(1, len(os.sched_getaffinity(0))), verbose=False)
    try:
        agree = total = 0
        kls, tok_diff = [], []
        for r in reference:
            got = llm.tokenize(r["prompt"].encode(), add_bos=False, special=True)
            if got != r["prompt_ids"]:
                tok_diff.append(f"{got[:8]}... vs {r['prompt_ids'][:8]}...")
            llm.reset()
            llm.eval(r["ids"])
            logits = np.asarray(llm.scores[: len(r["ids"])], dtype=np.float64)
            lq = logits - logits.max(-1, keepdims=True)
            lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
            lp = r["logp"].astype(np.float64)
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            total += len(r["ids"])
            kls.append(float((np.exp(lp) * (lp - lq)).sum(-1).mean()))
    finally:
        llm.close()
    return {"agreement": agree / max(1, total), "kl": float(np.mean(kls)), "positions": total,
            "tokenization_same": not tok_diff, "tokenization_detail": "; ".join(tok_diff[:2])}
