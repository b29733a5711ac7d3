"""batchlab: how batch size shapes neural-network training.

    from batchlab import TrainConfig, train
    result = train(TrainConfig(dataset="mnist-5k", batch_size=64, lr=0.01, epochs=3))
    result.final["test_acc"]
"""

__version__ = "0.1.0"

from batchlab.config import Phase, TrainConfig  # noqa: E402
from batchlab.store import Store  # noqa: E402
from batchlab.train import TrainResult, train  # noqa: E402

__all__ = ["Phase", "Store", "TrainConfig", "TrainResult", "__version__", "train"]
