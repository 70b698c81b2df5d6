"""The `eval`, `release`, `serve` and `tracking` sections of the config's schema: how a trained
stage is measured (stages/evaluate.py), what it ships (stages/release.py), how it is served
(cascade/serve.py) and where its figures are shown (cascade/tracking.py). Part of Config
(cascade/config.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Optional

from cascade import gguf
from cascade.validate import env_name, fail, number, safe_name


@dataclass
class EvalConfig:
    max_probes: Optional[int] = None  # held-out records scored for agreement; None: all
    batch_size: int = 8
    # the text-level measure: greedy answers of up to this many tokens to the held-out prompts,
    # compared with the teachers' answers by ROUGE-L F1; 0: off
    answer_tokens: int = 64
    # the distribution-level measure: the teachers read the student's own greedy and sampled answers
    # (above) and give the reverse KL(student || teacher) per token; costs one load of each teacher
    # per stage
    reverse_kl: bool = True
    # sampled answers per held-out prompt for the reverse KL's sampled figure (the j-th seeded by
    # seed + j): more, a steadier figure (on the tiny preset's 10 held-out probes, one sample's
    # figure moved by ~15 % between two checkpoints 34 steps apart)
    samples: int = 1
    # the conditioning (what the teachers' held-out answers owe to their own prompts): each answer's
    # log-likelihood after its prompt minus its mean after up to this many other held-out prompts
    # (the next ones); more: a steadier figure, at one more scoring pass of the records each
    other_prompts: int = 16
    # Ray resources of an evaluation task (it loads the student, and its base, one at a time)
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def check(self) -> None:
        for k in ("num_cpus", "num_gpus"):
            number(f"eval.{k}", getattr(self, k), 0)
        if self.max_probes is not None:
            number("eval.max_probes", self.max_probes, 1)
        number("eval.batch_size", self.batch_size, 1)
        number("eval.answer_tokens", self.answer_tokens, 0)
        number("eval.samples", self.samples, 1)
        number("eval.other_prompts", self.other_prompts, 1)

    def identity(self) -> dict:
        """What of this section determines the figures (the eval step's key: cascade/graph.py)."""
        out = dataclasses.asdict(self)
        if self.samples == 1:  # keys from before the setting stay as they were
            del out["samples"]
        return out


@dataclass
class ReleaseConfig:
    """stages/release.py: what the seed ships, per trained stage, in <run_dir>/<stage>/release/."""

    # the real presets turn it on; the tiny one on a switch: release.enabled=true
    enabled: bool = False
    # names the release: <family>-<stage> (a model card's title, GGUF file names)
    family: str = "cascade-gemma3"
    # GGUF types: F32, F16, BF16 from llama.cpp's converter; any type llama.cpp's quantizer offers
    # (Q8_0, Q4_K_M..)
    gguf: list[str] = field(default_factory=lambda: ["F16", "Q8_0", "Q4_K_M"])
    # held-out prompts (with their teachers' answers) each GGUF is compared on with transformers
    probes: int = 8
    # next-token argmax agreement an F32/F16 file must reach, else the step fails
    min_agreement: float = 0.99
    # ... any other type (BF16, quantized) must reach to ship; below it, `below_bar`: drop (not
    # shipped, the card says so) or mark (shipped, marked in the card's formats table)
    min_quant_agreement: float = 0.9
    below_bar: str = "drop"
    license: str = "eupl-1.2"  # the card's front matter; the base model's own terms still apply
    # lm-evaluation-harness tasks run on the released model: the project's own (cascade_probes,
    # cascade_format) work offline; on a cluster any harness task, e.g. ifeval
    harness: list[str] = field(default_factory=list)
    harness_limit: Optional[int] = None  # documents per harness task; None: all
    # Ray resources of the release's task (the student loaded for the GGUF checks, harness)
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def name(self, stage: str) -> str:
        """A stage's release name: its card's title, its GGUF files' prefix, the served model's id.
        """
        return f"{self.family}-{stage}"

    def check(self) -> None:
        safe_name("release.family", self.family)
        for k in ("num_cpus", "num_gpus"):
            number(f"release.{k}", getattr(self, k), 0)
        if not self.gguf:
            fail("release.gguf is empty: name at least one GGUF type (e.g. F16)")
        for t in self.gguf:
            if not gguf.valid_name(t):
                fail(f"release.gguf: {t!r} is not a llama.cpp type name (F16, Q8_0, Q4_K_M, ...)")
        number("release.probes", self.probes, 1)
        number("release.min_agreement", self.min_agreement, 0, 1)
        number("release.min_quant_agreement", self.min_quant_agreement, 0, 1)
        if self.below_bar not in ("drop", "mark"):
            fail(f"release.below_bar {self.below_bar!r}: drop or mark")
        for t in self.harness:
            safe_name("release.harness task", t)
        if self.harness_limit is not None:
            number("release.harness_limit", self.harness_limit, 1)


@dataclass
class ServeConfig:
    """`python -m cascade serve +stage=<s>`: an OpenAI-compatible server for a stage's release
    (cascade/serve.py)."""

    # vllm: the release's HF directory in vLLM's server; llamacpp: a GGUF in llama_cpp.server
    engine: str = "vllm"
    gguf: str = "F16"  # the GGUF type llamacpp serves
    host: str = "127.0.0.1"
    port: int = 8080
    # when this variable is set, requests need its value as a bearer key
    api_key_env: str = "CASCADE_API_KEY"

    def check(self) -> None:
        if self.engine not in ("vllm", "llamacpp"):
            fail(f"serve.engine {self.engine!r}: valid engines: vllm, llamacpp")
        number("serve.port", self.port, 1, 65535)
        env_name("serve.api_key_env", self.api_key_env)


@dataclass
class TrackingConfig:
    """The run in MLflow and W&B (cascade/tracking.py), from its committed records."""

    mlflow: bool = False
    wandb: bool = False  # offline, into <run_dir>/wandb (`wandb sync` uploads it)
    # None: a file store in the run directory (<run_dir>/mlflow); or any tracking URI (a server's
    # credentials come from MLflow's environment variables, never the config)
    uri: Optional[str] = None
    experiment: str = "cascade"  # MLflow's experiment, W&B's project

    def check(self) -> None:
        for name, on in (("mlflow", self.mlflow), ("wandb", self.wandb)):
            if on and importlib.util.find_spec(name) is None:
                fail(f"tracking.{name}=true: {name} is not installed "
                     "(pip install -e '.[tracking]')")
        if self.uri and "@" in self.uri.split("://", 1)[-1].split("/", 1)[0]:
            fail("tracking.uri carries credentials: give them through MLflow's environment "
                 "variables (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, ...)")
        if not self.experiment.strip():
            fail("tracking.experiment is empty")
