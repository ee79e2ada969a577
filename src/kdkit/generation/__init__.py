"""Generation for language-model distillation: teacher completions for sequence-level KD, student continuations for
on-policy KD (GKD). Layer 5.5: may import losses, teachers, models, data, types, config and errors; never engine."""

from kdkit.generation.generate import (
    GenerationSettings,
    OnPolicy,
    generate,
    read_generations,
    sequence_kd_examples,
    write_generations,
)

__all__ = [
    "GenerationSettings",
    "OnPolicy",
    "generate",
    "read_generations",
    "sequence_kd_examples",
    "write_generations",
]
