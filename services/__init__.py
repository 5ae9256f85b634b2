"""distillcache's services; the teacher service is services/teacher.

Imported as ``distillcache.services``: pyproject.toml maps that package to this folder. Run from the
repository root, ``import services...`` would load a second copy of these modules whose
classes (an error type, a model) differ from the real ones; that import fails here at once.
"""

if __name__ != "distillcache.services":
    raise ImportError(
        f"import distillcache.services, not {__name__}: the folder services/ is the package "
        "distillcache.services (see pyproject.toml's package-dir and the README's contributor notes)"
    )
