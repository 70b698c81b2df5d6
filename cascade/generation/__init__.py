"""Teacher generation: one small backend interface (hf, vllm) and the thin Ray actor that owns a backend."""
