"""Side-by-side benchmarks; each script prints a table and appends to RESULTS.md."""
