"""Sources of cluster state: each turns what it watches into a `Model`."""
