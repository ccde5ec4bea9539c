"""The run lifecycle every trainer shares: what happens around its optimisation step.

A trainer supplies its models, optimisers, its step (an importable function returning device tensors, no host
sync), its evaluation and its artifacts. This package does the rest, the same way for all of them:
`run.TrainingRun` (preemption watch, distributed environment and device, data prepared on rank 0 first, DDP
wrapping, resume state loaded and saved, the run record and its log), `loop.StepLoop` (per-step seeding, the
device-side loss window read once per log line with the finiteness guard, progress, cadences, a preemption
check between two steps), `samplers` (batch samplers that resume where the step counter says) and `config`
(`TrainerConfig`, the base of every trainer's config: hardware, seed, log cadence and their checks).
"""

from training.lifecycle.config import TrainerConfig
from training.lifecycle.loop import LossWindow, StepLoop
from training.lifecycle.run import TrainingRun
from training.lifecycle.samplers import DrawnSteps, ShuffledSteps

__all__ = ["DrawnSteps", "LossWindow", "ShuffledSteps", "StepLoop", "TrainerConfig", "TrainingRun"]
