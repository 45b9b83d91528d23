"""Whole runs: a stage's work with the policies around it (quality gates, run records),
wired here, above the stages, so that the stages import neither quality nor each other."""
