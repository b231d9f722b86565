"""Config modules of `python -m experiments.mnist --config FILE`."""
