"""mlmeta."""
