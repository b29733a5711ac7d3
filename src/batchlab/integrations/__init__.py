"""Adapters that put batchlab's measurements into other training frameworks (optional extras:
each imports its framework, so import the submodule you need, e.g.
`from batchlab.integrations.lightning import GradientNoiseScaleCallback`)."""
