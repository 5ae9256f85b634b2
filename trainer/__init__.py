"""The trainer: fits a student from teacher shards (see docs/trainer.md).

Entry points: ``distill train`` (``trainer.cli``), or ``trainer.loop.train(TrainConfig(...))``
from Python. Kept empty of imports so that reading the config does not load torch.
"""
