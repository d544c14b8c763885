"""pgseal benchmarks. `python -m bench` (what `make bench` runs); see bench/README.md."""
