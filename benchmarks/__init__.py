"""Speed and memory scripts: ``python -m benchmarks.NAME`` prints one JSON line (never a test)."""
