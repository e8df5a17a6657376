"""asv benchmarks for mlmeta (see ../README.md)."""
