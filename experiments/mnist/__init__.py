"""The tutorial's MNIST experiment: 784 -> 100 -> equilibrium layer -> 10."""
