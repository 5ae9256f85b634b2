"""The shard contract: schema, writer, reader, manifest, cache keys, input loading.

Imported as ``distillcache.shared``: pyproject.toml maps that package to this folder. Run from the
repository root, ``import shared...`` would load a second copy of these modules whose
classes (an error type, a model) differ from the real ones; that import fails here at once.
"""

if __name__ != "distillcache.shared":
    raise ImportError(
        f"import distillcache.shared, not {__name__}: the folder shared/ is the package "
        "distillcache.shared (see pyproject.toml's package-dir and the README's contributor notes)"
    )
