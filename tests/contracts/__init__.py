"""Contract suites every implementation of a seam must pass."""
