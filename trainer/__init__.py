"""The trainer: fits a student from teacher shards (see docs/trainer.md).

Entry points: ``distill train`` (``trainer.cli``), or ``trainer.loop.train(TrainConfig(...))``
from Python. Kept empty of imports so that reading the config does not load torch.

Imported as ``distillcache.trainer``: pyproject.toml maps that package to this folder. Run
from the repository root, ``import trainer...`` would load a second copy of these modules
whose classes differ from the real ones; that import fails here at once.
"""

if __name__ != "distillcache.trainer":
    raise ImportError(
        f"import distillcache.trainer, not {__name__}: the folder trainer/ is the package "
        "distillcache.trainer (see pyproject.toml's package-dir and the README's contributor notes)"
    )
