"""Networks and how they are optimized: models, optimizers (incl. layer-wise rules), weights on disk."""
