"""The training engine: one loop, steppers (autograd, fused, deferred, vectorized), schedules."""
