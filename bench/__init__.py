"""The benchmarks. Each runs as a script (python bench/bench_loss.py ...) and imports as
bench.bench_loss where the repository's top is on sys.path (the tests: pytest's pythonpath)."""
