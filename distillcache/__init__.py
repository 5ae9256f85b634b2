"""distillcache: run the teacher once, distil many times."""

__version__ = "0.1.0"
