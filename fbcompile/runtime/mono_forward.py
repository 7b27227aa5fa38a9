"""Mono-Forward learners (issue 5): local class heads trained by autograd or directional derivatives."""
