"""The tutorial's CIFAR-10 DEQ: conv stem, DEQ ResNet cell, BatchNorm, head."""
