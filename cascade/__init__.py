"""cascade: a teacher-student distillation cascade (LEM-Gemma3 1B -> 4B -> 12B -> 27B) on Ray, PEFT
and vLLM.

    python -m cascade +stage=4b models=tiny     # the tiny cascade on a laptop CPU
"""

__version__ = "0.1.0"
