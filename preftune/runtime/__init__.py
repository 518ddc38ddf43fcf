"""How any training run executes: the loop, the run directory, checkpoints and resume, progress, distribution,
and the reference a preference recipe compares against."""
