"""Pieces the experiments share: data readers, the training loop, plots."""
