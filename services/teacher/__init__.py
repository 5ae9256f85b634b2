"""The teacher service (see docs/teacher-service.md).

Imported as ``distillcache.services.teacher``: pyproject.toml maps that package to this folder. Run from the
repository root, ``import services.teacher...`` would load a second copy of these modules whose
classes (an error type, a model) differ from the real ones; that import fails here at once.
"""

if __name__ != "distillcache.services.teacher":
    raise ImportError(
        f"import distillcache.services.teacher, not {__name__}: the folder services/teacher/ is the package "
        "distillcache.services.teacher (see pyproject.toml's package-dir and the README's contributor notes)"
    )
