"""Planning: the Plans data model, the rule toolbox planners use, compute measurement and budget."""

from autoseg.plan.model import (
    PLANS_FILE,
    Augmentation,
    Configuration,
    Loss,
    Measurement,
    Network,
    Normalization,
    Optimizer,
    Plans,
    Resampling,
    Sampling,
    Schedule,
)

__all__ = ["PLANS_FILE", "Augmentation", "Configuration", "Loss", "Measurement", "Network", "Normalization",
           "Optimizer", "Plans", "Resampling", "Sampling", "Schedule"]
