"""`recommend` on the task contract: the optimizer it assumes (and its lr rule), another loss,
and a streamed data source that is never loaded whole."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset

from batchlab.config import make_config
from batchlab.recommend.decide import adaptive_lr, decide, noise_lr
from batchlab.recommend.run import POOL_EXAMPLES, recommend
from batchlab.runs.training import as_data
from batchlab.task import Data, objective_for

TP = [{"batch_size": b, "status": "ok", "seconds_per_step": 0.01} for b in (16, 64, 256, 1024)]


def test_adam_gets_square_root_scaling_below_b_crit_and_constant_above() -> None:
    # far below B_crit: quadrupling the batch doubles the lr (square root), SGD's quadruples
    assert adaptive_lr(1e-3, 16, 64, 1e6) == pytest.approx(2e-3, rel=1e-3)
    assert noise_lr(0.1, 16, 64, 1e6) == pytest.approx(0.4, rel=1e-3)
    # far above B_crit: constant
    assert adaptive_lr(1e-3, 1e5, 4e5, 10.0) == pytest.approx(1e-3, rel=1e-3)
    sgd = decide([dict(r) for r in TP], b_crit=1e8, s0=1000, b0=16, base_lr=0.1)
    adam = decide([dict(r) for r in TP], b_crit=1e8, s0=1000, b0=16, base_lr=0.1, optimizer="adam")
    b = sgd["recommended_batch_size"]
    assert b == adam["recommended_batch_size"] == 1024
    assert sgd["recommended_lr"] == pytest.approx(0.1 * b / 16, rel=1e-3)
    assert adam["recommended_lr"] == pytest.approx(0.1 * math.sqrt(b / 16), rel=1e-3)
    assert "square-root" in adam["lr_rule"] and "adam" in adam["lr_rule"]


class Stream(IterableDataset):
    """A regression stream generated on the fly: nothing holds it whole. Counts the examples
    each pass yields and the largest number read in one pass."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.w = torch.randn(8, generator=torch.Generator().manual_seed(99))
        self.passes: list[int] = []

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        self.passes.append(0)
        for _ in range(self.n):
            x = torch.randn(8, generator=g)
            self.passes[-1] += 1
            yield x, (x @ self.w + 0.3 * torch.randn((), generator=g)).reshape(1)


def test_recommend_streams_with_adam_and_mse_and_states_what_it_assumed(tmp_path) -> None:
    n = 3 * POOL_EXAMPLES  # longer than the measurement pool
    train = Stream(n, 0)
    obj = objective_for("mse")
    cfg = make_config(loss="mse", model="m:f", batch_size=64, lr=1e-2)
    td = as_data(Data(train=train, test=Stream(256, 1), identity="stream-v1"), cfg, obj)
    assert td.streamed and td.n_train is None
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    rep = recommend(net, td, device=torch.device("cpu"), base_batch=64, base_lr=1e-2, epochs=1,
                    tune_lr=False, max_batch=256, optimizer="adam", objective="mse")
    assert rep["optimizer"] == "adam" and "Adam" in rep["optimizer_note"]
    assert rep["loss"] == "mse" and rep["metric"] == "mse"
    assert "square-root" in rep["lr_rule"]
    ev = rep["evidence"]
    assert ev["measurement_run"]["optimizer"] == "adam"
    assert ev["n_train"] == n  # the stream's length is what the measurement run saw
    assert ev["data"]["streamed"] and ev["data"]["pool_examples"] == POOL_EXAMPLES < n
    # every pass is one streamed pass (never more than the stream's length in one go)
    assert max(train.passes) <= n
    assert all(r["engine"].startswith("autograd+adam") for r in rep["throughput"])
    assert rep["noise_scale"]["final_point"]["b_simple"] is not None


STREAM_MODULE = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.utils.data import IterableDataset
    from batchlab.task import Data

    class S(IterableDataset):
        def __init__(self, n, seed):
            self.n, self.seed = n, seed
        def __iter__(self):
            g = torch.Generator().manual_seed(self.seed)
            for _ in range(self.n):
                x = torch.randn(6, generator=g)
                yield x, torch.tensor(float(x.sum() > 0) + float(x[0] > 1))

    def data():
        return Data(train=S(1024, 0), test=S(256, 1), identity="toy-v1")

    def reg():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
""")


def test_recommend_cli_takes_optimizer_loss_and_a_stream(tmp_path, monkeypatch, capsys) -> None:
    from batchlab.cli import main

    (tmp_path / "bl_stream_mod.py").write_text(STREAM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bl_stream_mod", None)
    monkeypatch.setattr(sys, "argv", [
        "batchlab", "recommend", "--model", "bl_stream_mod:reg", "--data", "bl_stream_mod:data",
        "--loss", "mse", "--optimizer", "adamw", "--epochs", "1", "--batch-size", "32",
        "--lr", "0.01", "--max-batch", "64", "--no-lr-search", "--store", str(tmp_path / "s.db"),
        "--json", "--quiet", "--out", str(tmp_path / "rec")])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    sys.modules.pop("bl_stream_mod", None)
    assert code == 0, cap.err
    rep = json.loads(cap.out)
    assert rep["optimizer"] == "adamw" and rep["loss"] == "mse"
    assert rep["evidence"]["data"]["streamed"] and rep["evidence"]["data"]["identity"] == "toy-v1"
    assert (tmp_path / "rec" / "recommend.json").exists()


def test_recommend_refuses_an_unknown_optimizer_in_one_line() -> None:
    from batchlab.errors import ConfigError

    with pytest.raises(ConfigError, match="--optimizer must be one of sgd, adam, adamw"):
        recommend(nn.Linear(2, 2), None, device=torch.device("cpu"), optimizer="lars")


def test_device_and_data_dir_read_the_same_in_every_command() -> None:
    import click
    import typer

    from batchlab.cli.root import app

    helps: dict[str, dict[str, str]] = {"device": {}, "data_dir": {}}

    def walk(cmd: click.Command, path: str) -> None:
        for p in cmd.params:
            if p.name in helps:
                helps[p.name][path] = p.help
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "batchlab")
    assert {"batchlab train", "batchlab recommend"} <= set(helps["device"])
    for name, by_cmd in helps.items():
        assert len(set(by_cmd.values())) == 1, (name, by_cmd)


class WideStream(IterableDataset):
    """n examples of `d` features made on the fly, with a declared length."""

    def __init__(self, n: int, d: int, seed: int) -> None:
        self.n, self.d, self.seed = n, d, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.n // 256):
            x = torch.randn(256, self.d, generator=g)
            y = x[:, :8].sum(1, keepdim=True)
            yield from zip(x, y)


def test_a_stream_larger_than_the_memory_it_uses_is_never_resident() -> None:
    """About 1 GB of examples if held whole; recommend's peak RSS grows by a fraction of that
    (the measurement pool of POOL_EXAMPLES, the estimators' work and the model, not the set)."""
    from batchlab.analysis.throughput import _peak_rss_mb, _reset_peak_rss, _rss_mb

    if not _reset_peak_rss():
        pytest.skip("peak RSS cannot be reset on this platform")
    n, d = 250_112, 1024  # 977 MiB as float32
    obj = objective_for("mse")
    td = as_data(Data(train=WideStream(n, d, 0), test=WideStream(1024, d, 1), identity="wide-v1"),
                 make_config(loss="mse", model="m:f"), obj)
    torch.manual_seed(0)
    net = nn.Linear(d, 1)
    _reset_peak_rss()
    rss0 = _rss_mb()
    rep = recommend(net, td, device=torch.device("cpu"), base_batch=256, base_lr=1e-3, epochs=1,
                    tune_lr=False, max_batch=256, optimizer="adam", objective="mse")
    grew = _peak_rss_mb() - rss0
    data_mb = n * d * 4 / 2**20
    assert rep["evidence"]["n_train"] == n
    print(f"peak RSS grew {grew:.0f} MB for {data_mb:.0f} MB of streamed data")
    assert grew < data_mb / 4, f"peak RSS grew {grew:.0f} MB for {data_mb:.0f} MB of data"


class TinyLM(nn.Module):
    """A causal toy language model: token + position embeddings, a running mean over the
    prefix (causal), LayerNorm and an MLP."""

    def __init__(self, v: int = 16, d: int = 16, t: int = 8) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(v, d), nn.Parameter(torch.zeros(t, d))
        self.ln, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.out = nn.Linear(d, v)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos[: ids.shape[1]]
        h = torch.cumsum(h, 1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return self.out(h + self.mlp(self.ln(h)))


def test_recommend_on_a_causal_language_model_with_adamw_and_bf16() -> None:
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 16, (640, 9), generator=g)
    seq[:, 1:] = (seq[:, :-1] * 3 + 1) % 16
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    td = as_data((x[:512], y[:512], x[512:], y[512:]), make_config(loss="next_token", model="m:f"),
                 objective_for("next_token"))
    torch.manual_seed(0)
    rep = recommend(TinyLM(), td, device=torch.device("cpu"), base_batch=32, base_lr=3e-3,
                    epochs=1, tune_lr=False, max_batch=64, optimizer="adamw",
                    objective="next_token", amp="bf16")
    assert rep["metric"] == "ppl" and "test ppl" in rep["target"]
    assert rep["amp"] == "bf16" and rep["evidence"]["measurement_run"]["amp"] == "bf16"
    assert all(r["engine"] == "autograd+adamw+amp-bf16+loss-next_token" for r in rep["throughput"])
    assert rep["noise_scale"]["two_batch"] is not None and rep["noise_scale"]["b_noise"] is not None


def test_batchlab_recommend_is_callable_and_returns_a_dataclass() -> None:
    import batchlab
    from batchlab.recommend import Recommendation

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    def make() -> nn.Module:  # logits: the classification loss appends a LogSoftmax
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    rec = batchlab.recommend(make, (x, y), optimizer="adam", batch_size=32, lr=1e-2, epochs=1,
                             tune_lr=False, max_batch=128, device="cpu")
    assert isinstance(rec, Recommendation)
    assert rec.optimizer == "adam" and "square-root" in rec.lr_rule
    assert rec.batch_size in (16, 32, 64, 128) and rec.lr > 0
    assert rec.report["evidence"]["measurement_run"]["optimizer"] == "adam"
    with pytest.raises(Exception, match="not an nn.Module"):
        batchlab.recommend(lambda: "net", (x, y), device="cpu")
