"""Adapters that put batchlab's measurements into other training frameworks (optional extras:
each imports its framework, so import the submodule you need):

- `lightning.GradientNoiseScaleCallback` (`batchlab[lightning]`),
- `huggingface.GradientNoiseScaleCallback`, a `transformers.TrainerCallback`
  (`batchlab[huggingface]`),
- `accelerate.AccelerateNoiseScale` for an Accelerate loop (`batchlab[accelerate]`),
- `sinks`: `TensorBoardSink` (`batchlab[tensorboard]`), `MLflowSink` (`batchlab[mlflow]`) and
  helpers that send a noise-scale history, a run's epochs or a recommendation to them.
"""
