"""Config modules of `python -m experiments.cifar10 --config FILE`."""
