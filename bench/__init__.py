"""The benchmark harness behind `leadflow bench` (see README, "Benchmarks")."""
