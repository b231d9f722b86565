"""Fixed-point solvers: configuration objects run by one loop driver."""
