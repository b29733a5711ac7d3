"""Measurements of a model at one point in weight space: loss and accuracy (metrics), Hessian
operators and solvers (curvature), per-example gradients and the gradient noise scale (noise).
Pure math on any `nn.Module`; nothing here trains or stores."""
