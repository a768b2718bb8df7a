"""Data plane: the balancing reverse proxy."""
