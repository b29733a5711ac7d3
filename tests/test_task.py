"""The task contract (batchlab.task): objectives beyond classification, data sources that are
not resident tensors (map-style Dataset, IterableDataset, loader factory: streamed), the store
key of a stream, integer inputs for an nn.Embedding, AMP in the autograd stepper, and the
Python API `batchlab.train(model=, data=, loss=)`."""

from __future__ import annotations

import itertools
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

import batchlab
from batchlab.config import make_config
from batchlab.data.stream import PREFIX_EXAMPLES, StreamData
from batchlab.engine import steppers
from batchlab.errors import BatchlabError, ConfigError, DataError
from batchlab.runs.store import Store
from batchlab.task import Classification, Data, NextToken, Objective, Regression, objective_for

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingStream(IterableDataset):
    """A seeded stream of (x, y) examples made on the fly; counts the examples handed out."""

    def __init__(self, n: int, d: int = 8, seed: int = 0, shift: float = 0.0) -> None:
        self.n, self.d, self.seed, self.shift = n, d, seed, shift
        self.served = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        w = torch.linspace(-1, 1, self.d)
        for s in range(0, self.n, 512):
            x = torch.randn(min(512, self.n - s), self.d, generator=g) + self.shift
            y = (x @ w > 0).long()
            for pair in zip(x, y):
                self.served += 1
                yield pair


def regression_data(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * torch.randn(n, generator=g)


def lm_data(n: int = 400, vocab: int = 16, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences where every token is the previous one + 1 (mod vocab): learnable from one
    token of context, so an embedding + linear model gets the perplexity near 1."""
    start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
    seq = (start + torch.arange(t + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.out = nn.Linear(16, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)))


# -- objectives ----------------------------------------------------------------------------
@pytest.mark.parametrize("obj, out, y", [
    (Classification(), torch.randn(6, 3).log_softmax(1), torch.tensor([0, 1, 2, 0, 1, 2])),
    (Regression(), torch.randn(6, 1), torch.randn(6)),
    (NextToken(), torch.randn(6, 4, 5), torch.randint(0, 5, (6, 4))),
])
def test_per_example_losses_average_to_the_batch_loss(obj: Objective, out, y) -> None:
    assert obj.per_example(out, y).shape == (6,)
    assert float(obj.per_example(out, y).mean()) == pytest.approx(float(obj.loss(out, y)), rel=1e-6)
    assert obj(out, y) is not None  # an objective is its own loss_fn


def test_perplexity_is_exp_of_the_token_nll() -> None:
    out, y = torch.randn(3, 4, 7), torch.randint(0, 7, (3, 4))
    s, c = NextToken().metric_terms(out, y)
    assert float(c) == 12
    ppl = float(NextToken().finish(s / c))
    assert ppl == pytest.approx(float(torch.exp(NextToken().loss(out, y))), rel=1e-5)


@pytest.mark.parametrize("loss, message", [
    ("hinge", "loss must be cross_entropy, mse, next_token or module:factory"),
    ("object:", "loss must be"),
])
def test_unknown_loss_is_one_line(loss: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        make_config(loss=loss)
    assert "\n" not in str(e.value)


def test_keys_change_with_loss_and_amp_only_when_set() -> None:
    base = make_config()
    assert "loss" not in base.semantic_dict() and "amp" not in base.semantic_dict()
    assert make_config(loss="mse").key("d") != base.key("d")
    assert make_config(amp="bf16").key("d") != base.key("d")


def test_classification_only_parts_refuse_other_losses() -> None:
    with pytest.raises(ConfigError, match="built-in datasets are classification"):
        batchlab.train(loss="mse", epochs=1)
    x, y = regression_data()
    with pytest.raises(ConfigError, match="built-in mlp is a classifier"):
        batchlab.train(data=(x, y), loss="mse", epochs=1)
    with pytest.raises(ConfigError, match="needs classification; loss mse measures mse"):
        batchlab.train(model=lambda: nn.Linear(5, 1), data=(x, y), loss="mse", epochs=1,
                       target_metric="test_acc", target_value=0.5)


def test_require_accuracy_names_the_metric() -> None:
    from batchlab.task import require_accuracy

    require_accuracy(Classification(), "batch-size")
    with pytest.raises(ConfigError, match="batch-size measures test accuracy.*metric ppl"):
        require_accuracy(NextToken(), "batch-size")


# -- Python API on tensors ----------------------------------------------------------------------
def test_regression_trains_and_reports_its_metric() -> None:
    x, y = regression_data()
    res = batchlab.train(model=lambda: nn.Linear(5, 1), data=(x, y), loss="mse", batch_size=32,
                         lr=0.05, epochs=4, seed=1)
    assert res.final["engine"] == "autograd" and res.final["metric"] == "mse"
    assert res.final["metric_higher_is_better"] is False
    assert res.metric() == res.final["test_mse"] and res.metric() < 0.1 * res.epochs[0]["test_mse"]
    assert res.final["best_test_mse"] == min(e["test_mse"] for e in res.epochs)


def test_target_on_the_objective_metric_stops_the_run() -> None:
    x, y = regression_data()
    res = batchlab.train(model=lambda: nn.Linear(5, 1), data=(x, y), loss="mse", batch_size=32,
                         lr=0.05, epochs=30, target_metric="test_metric", target_value=1.0)
    assert res.final["target_reached"] and res.final["target_epoch"] < 30
    assert res.epochs[-1]["test_mse"] <= 1.0


def test_integer_inputs_stay_integer_for_an_embedding() -> None:
    x, y = lm_data()
    res = batchlab.train(model=TinyLM, data=(x, y), loss="next_token", batch_size=32, lr=0.5,
                         epochs=6)
    assert res.status == "completed" and res.final["metric"] == "ppl"
    assert res.epochs[0]["test_ppl"] > 8 and res.metric() < 2.0  # vocab 16 -> near certain


def test_loss_object_and_plain_function_are_keyed_by_their_identity(tmp_path: Path) -> None:
    x, y = regression_data()

    def l1(out, target):
        return (out.squeeze(1) - target).abs().mean()

    with Store(tmp_path / "s.db") as st:
        a = batchlab.train(model=lambda: nn.Linear(5, 1), data=(x, y), loss=l1, epochs=1, store=st)
        assert a.config.loss.startswith("object:") and a.final["metric"] == "loss"
        b = batchlab.train(model=lambda: nn.Linear(5, 1), data=(x, y), loss=l1, epochs=1, store=st)
        assert b.cached and b.key == a.key
        c = batchlab.train(model=lambda: nn.Linear(5, 1), data=(x, y), loss=Regression(), epochs=1,
                           store=st)
        assert c.key != a.key and c.config.loss == "mse"


def test_custom_objective_from_a_module_spec(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "tk_loss.py").write_text(textwrap.dedent("""
        import torch
        from batchlab.task import Objective

        class Huber(Objective):
            name, metric_name = "huber", "huber"

            def loss(self, out, y):
                return torch.nn.functional.huber_loss(out.squeeze(1), y)

        def make():
            return Huber()

        def not_one():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y = regression_data()
    res = batchlab.train(model=lambda: nn.Linear(5, 1), data=(x, y), loss="tk_loss:make", epochs=2)
    assert res.final["metric"] == "huber" and res.metric() is not None
    with pytest.raises(BatchlabError, match="not an Objective"):
        objective_for("tk_loss:not_one")
    sys.modules.pop("tk_loss", None)


# -- streamed sources -----------------------------------------------------------------------------
def test_iterable_dataset_is_streamed_and_its_prefix_read_once() -> None:
    train, test = CountingStream(5000), CountingStream(600, seed=1)
    sd = StreamData(train, test, identity="counting-v1")
    assert train.served == PREFIX_EXAMPLES and sd.n_train is None  # a bounded read for the key
    res = batchlab.train(model=lambda: nn.Linear(8, 2), data=sd, loss="cross_entropy",
                         batch_size=100, lr=0.5, epochs=2)
    assert res.status == "completed" and res.final["engine"] == "autograd"
    assert res.final["steps"] == 100 and res.final["samples"] == 10_000
    assert res.metric() > 0.9


def test_stream_fingerprint_covers_identity_and_prefix_only() -> None:
    fp = StreamData(CountingStream(3000), CountingStream(300, seed=1), identity="a").fingerprint
    assert StreamData(CountingStream(3000), CountingStream(300, seed=1), identity="a").fingerprint == fp
    assert StreamData(CountingStream(3000), CountingStream(300, seed=1), identity="b").fingerprint != fp
    assert StreamData(CountingStream(3000, shift=1.0), CountingStream(300, seed=1),
                      identity="a").fingerprint != fp
    # what it does not see: a change beyond the prefix with the same identity (documented)
    assert StreamData(CountingStream(4000), CountingStream(300, seed=1), identity="a").fingerprint == fp


def test_map_style_dataset_and_loader_factory_train() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    res = batchlab.train(model=lambda: nn.Linear(6, 2), data=TensorDataset(x, y), batch_size=50,
                         lr=0.5, epochs=2, loss="cross_entropy")
    assert res.final["steps"] == 2 * 18  # 900 after the seeded 10% test split
    seeds = []

    def factory(batch_size: int, seed: int):
        seeds.append(seed)
        p = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        return ((x[p[i:i + batch_size]], y[p[i:i + batch_size]]) for i in range(0, len(x), batch_size))

    res = batchlab.train(model=lambda: nn.Linear(6, 2), data=Data(factory, (x[:200], y[:200])),
                         batch_size=100, lr=0.5, epochs=3, loss="cross_entropy")
    assert res.final["steps"] == 30 and res.metric() > 0.85
    # one seed per epoch from the run's shuffle stream (seed 0: the prefix and train evaluation)
    assert len(set(seeds) - {0}) == 3


def test_streamed_runs_are_stored_and_found_again(tmp_path: Path) -> None:
    def data() -> Data:
        return Data(CountingStream(2000), CountingStream(300, seed=1), identity="c-v1")

    with Store(tmp_path / "s.db") as st:
        a = batchlab.train(model=lambda: nn.Linear(8, 2), data=data(), loss="cross_entropy",
                           batch_size=100, epochs=1, store=st)
        b = batchlab.train(model=lambda: nn.Linear(8, 2), data=data(), loss="cross_entropy",
                           batch_size=100, epochs=1, store=st)
    assert b.cached and b.key == a.key


def test_a_stream_without_test_part_or_length_is_refused_clearly() -> None:
    with pytest.raises(DataError, match="needs a test part"):
        batchlab.train(model=lambda: nn.Linear(8, 2), data=CountingStream(1000), epochs=1,
                       loss="cross_entropy")
    with pytest.raises(ConfigError, match="known length"):
        batchlab.train(model=lambda: nn.Linear(8, 2), loss="cross_entropy", epochs=1,
                       data=Data(CountingStream(1000), CountingStream(100, seed=1)),
                       warmup_epochs=0.5)


_mods = (f"tk_stream_{i}" for i in itertools.count())


def test_cli_train_on_a_streamed_loader_with_loss_flag(run_main, tmp_path: Path, monkeypatch, capsys) -> None:
    name = next(_mods)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torch.utils.data import IterableDataset
        from batchlab.task import Data

        class Stream(IterableDataset):
            def __init__(self, n, seed):
                self.n, self.seed = n, seed
            def __iter__(self):
                g = torch.Generator().manual_seed(self.seed)
                x = torch.randn(self.n, 3, generator=g)
                yield from zip(x, x @ torch.tensor([1.0, 2.0, -1.0]))

        def load():
            return Data(Stream(800, 0), Stream(200, 1), identity="lin-v1")

        def make():
            return nn.Linear(3, 1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    rc = run_main(*["train", "--model", f"{name}:make", "--data", f"{name}:load", "--loss", "mse",
                   "--amp", "bf16", "--epochs", "2", "--batch-size", "50", "--lr", "0.1", "--json",
                   "--store", str(tmp_path / "s.db")])
    import json

    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] == "completed"
    assert out["final"]["metric"] == "mse" and out["final"]["amp"] == "bf16"
    assert out["final"]["steps"] == 32 and out["config"]["loss"] == "mse"
    sys.modules.pop(name, None)


def test_sweep_toml_keys_loss_and_amp() -> None:
    from batchlab.runs.sweep import expand

    cfgs = expand({"loss": "mse", "amp": "bf16", "data": "m:load", "model": "m:make"},
                  {"batch_size": [8, 16]})
    assert [(c.loss, c.amp) for c in cfgs] == [("mse", "bf16")] * 2
    with pytest.raises(ConfigError, match="amp"):
        expand({"amp": "fp8"}, {})


# -- AMP ------------------------------------------------------------------------------------------
def test_bf16_autocast_on_cpu_trains_close_to_float32() -> None:
    x, y = lm_data()
    kw = dict(model=TinyLM, data=(x, y), loss="next_token", batch_size=32, lr=0.5, epochs=3)
    full, half = batchlab.train(**kw), batchlab.train(amp="bf16", **kw)
    assert half.final["amp"] == "bf16" and "amp" not in full.final
    assert half.metric() == pytest.approx(full.metric(), rel=0.1)
    assert half.key != full.key


def test_fp16_on_cpu_is_refused_in_one_line() -> None:
    x, y = regression_data()
    with pytest.raises(ConfigError, match="amp fp16 needs a GPU") as e:
        batchlab.train(model=lambda: nn.Linear(5, 1), data=(x, y), loss="mse", amp="fp16",
                       device="cpu", epochs=1)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="autograd"):
        make_config(amp="bf16", engine="fused")


def test_grad_scaler_path_leaves_unscaled_gradients_for_probes(monkeypatch) -> None:
    """The fp16 path's scaler logic, on the CPU: a GradScaler with a large scale, no autocast.
    After a step, `.grad` (what gradient probes read) is the true gradient."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    monkeypatch.setattr(steppers, "amp_context", lambda amp, dev: (nullcontext, scaler))
    x, y = regression_data(64)
    torch.manual_seed(0)
    net = nn.Linear(5, 1)
    ref = nn.Linear(5, 1)
    ref.load_state_dict(net.state_dict())
    cfg = make_config(loss="mse", amp="bf16", lr=0.01)
    st = steppers.AutogradStepper(cfg, net, keep_grads=True)
    st.step(x.unsqueeze(0), y.unsqueeze(0), [0.01])
    Regression().loss(ref(x), y).backward()
    assert torch.allclose(net.weight.grad, ref.weight.grad, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(net.weight, ref.weight - 0.01 * ref.weight.grad, rtol=1e-5)


def test_a_step_with_inf_gradients_is_skipped_by_the_scaler(monkeypatch) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    monkeypatch.setattr(steppers, "amp_context", lambda amp, dev: (nullcontext, scaler))
    net = nn.Linear(5, 1)
    before = net.weight.detach().clone()
    st = steppers.AutogradStepper(make_config(loss="mse", amp="bf16"), net)
    x = torch.full((1, 4, 5), float("inf"))
    st.step(x, torch.zeros(1, 4), [0.1])
    assert torch.equal(net.weight.detach(), before) and scaler.get_scale() < 2.0**12
