"""The worker: consumer loop, offsets, executor, effects and dead letters."""
