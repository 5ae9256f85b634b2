"""`python -m distillcache` is the `distill` command (used where the script is not on PATH)."""

from distillcache.cli import main

main()
