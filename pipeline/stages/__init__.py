"""One module per stage, each defining `STAGE` (see base.py). The runner discovers them by name."""
