"""Integrations: the Lightning callback (accumulation, resume from a checkpoint, cleanup on an
exception, no logging every step by default), the Hugging Face TrainerCallback on a GPT-2 built
from a config (no downloads), the Accelerate hook, and the TensorBoard / MLflow sinks."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchlab.errors import BatchlabError
from batchlab.integrations.sinks import MemorySink, log_noise_history, log_recommendation, log_result

pytestmark = pytest.mark.usefixtures("one_thread")


def regression_data(n: int = 256) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True) + 0.3 * torch.randn(n, 1, generator=g))


def lightning_module(fail_at: int | None = None):
    pl = pytest.importorskip("lightning.pytorch")

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 1))

        def training_step(self, batch, i):
            if fail_at is not None and i == fail_at:
                raise RuntimeError("planted failure")
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return pl, Regression()


def trainer(pl, tmp_path, cb, max_steps: int, **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, callbacks=[cb],
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kw)


def test_lightning_accumulation_resume_and_sinks(tmp_path) -> None:
    from batchlab.integrations.lightning import GradientNoiseScaleCallback
    from batchlab.measure.noise_micro import MicroBatchNoiseScale

    pl, module = lightning_module()
    loader = torch.utils.data.DataLoader(regression_data(), batch_size=16)
    sink = MemorySink()
    cb = GradientNoiseScaleCallback(log_every=2, sinks=[sink])
    t = trainer(pl, tmp_path, cb, 6, accumulate_grad_batches=2, enable_checkpointing=True)
    t.fit(module, loader)
    assert isinstance(cb.gns, MicroBatchNoiseScale)  # accumulation: micro-batch estimator
    assert [h.batch_size for h in cb.gns.history] == [32] * 6  # 2 micro-batches of 16
    assert [s for s, _ in sink.rows] == [0, 2, 4]  # every 2nd measured step, at global_step
    assert not cb.gns._handles  # hooks removed at the end
    first = cb.state_dict()
    assert first["n_ema"] == 6
    ckpt = t.checkpoint_callback.best_model_path
    # resume: a fresh callback continues the averages instead of starting over
    pl2, module2 = lightning_module()
    cb2 = GradientNoiseScaleCallback(log_every=100)
    trainer(pl2, tmp_path, cb2, 9, accumulate_grad_batches=2).fit(module2, loader, ckpt_path=ckpt)
    assert cb2.state_dict()["n_ema"] == 6 + 3
    assert math.isfinite(cb2.gns.b_simple)


def test_lightning_default_logs_rarely_and_cleans_up_on_an_exception(tmp_path) -> None:
    from batchlab.integrations.lightning import GradientNoiseScaleCallback

    pl, module = lightning_module(fail_at=3)
    loader = torch.utils.data.DataLoader(regression_data(), batch_size=16)
    sink = MemorySink()
    cb = GradientNoiseScaleCallback(sinks=[sink])
    assert cb.log_every > 1  # reading the numbers syncs the host: not every step by default
    with pytest.raises(RuntimeError, match="planted failure"):
        trainer(pl, tmp_path, cb, 10, enable_checkpointing=False).fit(module, loader)
    assert cb.gns.coverage == 1.0  # LayerNorm has a per-example rule
    assert not cb.gns._hooks._handles  # hooks removed although fit raised
    assert len(sink.rows) == 1  # the first measured step only (log_every=50)


def test_huggingface_trainer_callback_on_gpt2_from_a_config(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from batchlab.integrations.huggingface import GradientNoiseScaleCallback
    from batchlab.measure.noise_micro import MicroBatchNoiseScale

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (64, 12), generator=torch.Generator().manual_seed(1))

    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    sink = MemorySink()
    cb = GradientNoiseScaleCallback(log_every=1, sinks=[sink])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_steps=4, learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="no", disable_tqdm=True, max_grad_norm=1.0)
    transformers.Trainer(model=model, args=args, train_dataset=DS(), callbacks=[cb]).train()
    assert isinstance(cb.gns, MicroBatchNoiseScale) and cb.gns.coverage == 1.0
    assert [h.batch_size for h in cb.gns.history] == [8] * 4
    assert [s for s, _ in cb.logged] == [1, 2, 3, 4] and len(sink.rows) == 4
    assert all(math.isfinite(h.g_big_sq) and h.g_big_sq > 0 for h in cb.gns.history)
    st = cb.state()
    assert st["attributes"]["gns_state"]["n_ema"] == 4
    # one micro-batch per step without clipping: per-example hooks (GPT-2's tied and position
    # embeddings reported, the rest covered)
    from batchlab.measure.gns import GradientNoiseScale

    cb0 = GradientNoiseScaleCallback(log_every=1)
    args0 = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, max_grad_norm=0.0)
    with pytest.warns(RuntimeWarning):
        transformers.Trainer(model=model, args=args0, train_dataset=DS(), callbacks=[cb0]).train()
    assert isinstance(cb0.gns, GradientNoiseScale) and len(cb0.gns.history) == 2
    assert "lm_head" in cb0.gns.unsupported and cb0.gns.coverage > 0.5
    # one micro-batch per step and clipping on: refused in one line
    args1 = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                           max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(BatchlabError, match="gradient_accumulation_steps >= 2"):
        transformers.Trainer(model=model, args=args1, train_dataset=DS(),
                             callbacks=[GradientNoiseScaleCallback()]).train()


def test_accelerate_hook_measures_once_per_optimizer_step(tmp_path) -> None:
    accelerate = pytest.importorskip("accelerate")
    from batchlab.integrations.accelerate import AccelerateNoiseScale

    acc = accelerate.Accelerator(gradient_accumulation_steps=4, cpu=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(regression_data(), batch_size=8)
    model, opt, loader = acc.prepare(model, opt, loader)
    gns = AccelerateNoiseScale(acc, model, micro_batch_size=8, log_every=1)
    for x, y in loader:
        with acc.accumulate(model):
            acc.backward(F.mse_loss(model(x), y))
            gns.step()
            opt.step()
            opt.zero_grad()
    assert len(gns.gns.history) == 256 // 8 // 4
    assert all(h.batch_size == 32 for h in gns.gns.history)
    assert math.isfinite(gns.b_simple) and gns.b_simple > 0
    acc.save_state(str(tmp_path / "ckpt"))  # registered for checkpointing
    saved = gns.state_dict()
    gns.gns.reset()
    acc.load_state(str(tmp_path / "ckpt"))
    assert gns.state_dict() == saved


def test_tensorboard_and_mlflow_sinks(tmp_path, monkeypatch) -> None:
    from batchlab.integrations.sinks import MLflowSink, TensorBoardSink
    from batchlab.measure.gns import GradientNoiseScale

    net = nn.Linear(5, 1)
    gns = GradientNoiseScale(net)
    data = regression_data(64)
    for i in range(4):
        net.zero_grad()
        x, y = data[i * 16:(i + 1) * 16]
        F.mse_loss(net(x), y).backward()
        gns.step()
    pytest.importorskip("tensorboard")
    tb = TensorBoardSink(tmp_path / "tb")
    assert log_noise_history(tb, gns) == 4
    tb.log({"bad": math.inf, "flag": True}, 0)  # non-finite and non-numbers are dropped
    tb.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "tb"))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    assert "gns/b_simple" in tags and "bad" not in tags
    assert [e.step for e in ev.Scalars("gns/b_simple")] == [0, 1, 2, 3]

    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local directory, no server
    ml = MLflowSink(tracking_uri=(tmp_path / "mlruns").as_uri(), run_name="t")
    log_recommendation(ml, {"recommended_batch_size": 256, "recommended_lr": 0.1,
                            "noise_scale": {"b_simple": 900.0,
                                            "history": [{"step": 5, "b_simple": 800.0}]}})
    run_id = ml.run.info.run_id
    ml.close()
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    m = client.get_run(run_id).data.metrics
    assert m["recommend/recommended_batch_size"] == 256 and m["recommend/b_simple"] == 900.0


def test_log_result_and_missing_backends_are_one_line(monkeypatch, tmp_path) -> None:
    from batchlab.integrations import sinks

    class Res:
        epochs = [{"epoch": 0, "steps": 0, "train_loss": 2.0},
                  {"epoch": 1, "steps": 10, "train_loss": 1.0, "b_simple": math.nan}]

    mem = MemorySink()
    assert log_result(mem, Res()) == 2
    assert mem.rows == [(0, {"train_loss": 2.0}), (10, {"train_loss": 1.0})]
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(BatchlabError, match=r"batchlab\[mlflow\]"):
        sinks.MLflowSink()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(BatchlabError, match=r"batchlab\[tensorboard\]"):
        sinks.TensorBoardSink(tmp_path)


class FileSink:
    """Lines 'rank step b_simple' in a file (a spawned process's sink must leave a trace)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def log(self, metrics, step: int) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else -1
        with open(self.path, "a") as f:
            f.write(f"{rank} {step} {metrics['gns/b_simple']}\n")

    def close(self) -> None:
        """Nothing held open."""


try:
    import lightning.pytorch as _pl
except ImportError:  # pragma: no cover - depends on the environment
    _pl = None

if _pl is not None:
    class PicklableRegression(_pl.LightningModule):
        """At module level: ddp_spawn pickles the module into its processes."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, i):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_ddp_on_two_cpu_processes_logs_on_rank_zero_only(tmp_path) -> None:
    if _pl is None:
        pytest.skip("lightning is not installed")
    from batchlab.integrations.lightning import GradientNoiseScaleCallback

    pl, module = _pl, PicklableRegression()
    loader = torch.utils.data.DataLoader(regression_data(), batch_size=16)
    cb = GradientNoiseScaleCallback(log_every=1, sinks=[FileSink(tmp_path / "log.txt")])
    t = pl.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                   callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=tmp_path)
    t.fit(module, loader)
    rows = [ln.split() for ln in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r[0] for r in rows] == ["0"] * 4  # DDP: the micro-batch estimator, rank zero logs
    assert [int(r[1]) for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(float(r[2])) for r in rows)
