"""Training scripts that reproduce the Deep Implicit Layers tutorial."""
