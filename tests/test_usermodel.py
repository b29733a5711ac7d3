"""Your model, your data: `model = "cnn" | "module:factory"` and `data = "module:loader"` in the
config, the store key that covers them, geometry per parameter tensor, the CLI end to end on a
tiny user CNN written to a temporary file, and the experiments that say they need the MLP."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from batchlab.config import TrainConfig, make_config
from batchlab.engine.setup import get_data
from batchlab.errors import BatchlabError, ConfigError, DataError
from batchlab.runs.store import Store
from batchlab.runs.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

# computed on the code before `model`/`data` were widened: stores from before must be found
GOLDEN_DEFAULT_KEY = "55811f317b2963bdbd653cadc719f702634469d42b84c726f454ec16d375aca9"
GOLDEN_MLP_KEY = "4320ba081e1b807020af65be7e9f1193cc7e03fd76737cb750387644ed53bf8b"

USER_CODE = """
import torch
from torch import nn

N = {n}

def make():
    # a tiny CNN returning logits
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))

def make_logprobs():
    torch.manual_seed(123)  # ignores the run's seed: the weights hash still keys it
    return nn.Sequential(make(), nn.LogSoftmax(dim=-1))

def make_other():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

def load():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (N,), generator=g)
    x = torch.randn(N, 1, 8, 8, generator=g) * 0.5
    for c in range(3):
        x[y == c, 0, 2 * c:2 * c + 2, :] += 1.0
    return x, y

def load4():
    x, y = load()
    return x[:200], y[:200], x[200:], y[200:]

def load_flat():
    x, y = load()
    return x.reshape(len(x), -1)[:, :60], y

def not_a_model():
    return 3

def broken():
    raise RuntimeError("disk on fire")

class Flaky(nn.Module):
    # passes the boundary's check, then fails in its third training step
    def __init__(self):
        super().__init__()
        self.net, self.calls = make(), 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls > 2:
                raise RuntimeError("boom mid-training")
        return self.net(x)

def flaky():
    return Flaky()
"""

_names = (f"um_user_{i}" for i in itertools.count())


@pytest.fixture
def mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh user module (unique name: sys.modules caches imports) on sys.path."""
    name = next(_names)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # tests edit the module in place
    (tmp_path / f"{name}.py").write_text(USER_CODE.format(n=300))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def cfg(mod: str, **kw) -> TrainConfig:
    return make_config(**{"model": f"{mod}:make", "data": f"{mod}:load", "epochs": 1,
                          "batch_size": 32, "lr": 0.1, "probes": [], **kw})


# -- config and key ----------------------------------------------------------------------------
def test_keys_of_existing_configs_are_unchanged() -> None:
    assert TrainConfig().key("abc") == GOLDEN_DEFAULT_KEY
    c = TrainConfig(dataset="mnist", batch_size=256, lr=0.1, hidden=[32], epochs=2)
    assert c.key("f00") == GOLDEN_MLP_KEY
    assert "data" not in TrainConfig().semantic_dict()
    assert TrainConfig(data="m:load").key("abc") != GOLDEN_DEFAULT_KEY
    assert TrainConfig(model="cnn").key("abc") != GOLDEN_DEFAULT_KEY


@pytest.mark.parametrize("fields, message", [
    ({"model": "resnet"}, "model must be mlp, cnn or module:factory"),
    ({"model": "mod:"}, "module:factory"),
    ({"data": "nocolon"}, "data must be module:loader"),
    ({"model": "cnn", "batchnorm": True}, "built-in mlp only"),
])
def test_bad_model_or_data_fields_are_one_line_errors(fields, message) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        make_config(**fields)
    assert "\n" not in str(e.value)


def test_key_covers_factory_weights_and_data_content(mod: str, tmp_path: Path) -> None:
    base = train(cfg(mod), store=tmp_path / "s.db")
    assert base.final["engine"] == "autograd" and not base.cached
    again = train(cfg(mod), store=tmp_path / "s.db")
    assert again.cached and again.key == base.key  # stored and found again (resumable)
    assert train(cfg(mod, seed=1)).key != base.key  # other seed, other init
    assert train(cfg(mod, model=f"{mod}:make_other")).key != base.key
    # the same specs, edited code: new weights (or new data) -> new key
    path = tmp_path / f"{mod}.py"
    src = path.read_text()
    for edit in (("nn.Conv2d(1, 4, 3", "nn.Conv2d(1, 4, 3, bias=False"), ("N = 300", "N = 301  # more")):
        path.write_text(src.replace(*edit))
        sys.modules.pop(mod, None)
        importlib.invalidate_caches()
        assert train(cfg(mod)).key != base.key, edit


def test_logits_and_log_probabilities_give_the_same_loss(mod: str) -> None:
    a = train(cfg(mod, model=f"{mod}:make_logprobs", probes=[]))
    torch.manual_seed(123)
    from batchlab.nn.factory import as_log_probs

    m = sys.modules[mod]
    logits = m.make()  # the same weights as make_logprobs, without the LogSoftmax
    b = train(cfg(mod, probes=[]), model=as_log_probs(logits))
    for k in ("train_loss", "test_loss", "train_acc"):
        assert a.final[k] == pytest.approx(b.final[k], rel=1e-5), k


def test_two_and_four_tensor_loaders(mod: str) -> None:
    td2 = get_data(cfg(mod), torch.device("cpu"))
    assert td2.n_train == 270 and len(td2.eval_sets["test"][1]) == 30  # seeded 10% held out
    assert td2.x_train.shape[1:] == (1, 8, 8) and td2.n_classes == 3
    assert torch.equal(td2.x_train, get_data(cfg(mod, seed=5), torch.device("cpu")).x_train)
    td4 = get_data(cfg(mod, data=f"{mod}:load4"), torch.device("cpu"))
    assert td4.n_train == 200 and len(td4.eval_sets["test"][1]) == 100
    assert td4.fingerprint != td2.fingerprint
    flat = get_data(cfg(mod, model="mlp"), torch.device("cpu"))  # the MLP sees vectors
    assert flat.x_train.shape == (270, 64) and flat.fingerprint == td2.fingerprint


def test_builtin_mlp_on_user_image_data_uses_the_fused_engine(mod: str) -> None:
    res = train(cfg(mod, model="mlp", hidden=[16]))
    assert res.status == "completed" and res.final["engine"] == "fused"


def test_builtin_cnn_trains_deterministically_and_is_seeded() -> None:
    from batchlab.engine.setup import build_model

    c = make_config(dataset="digits", model="cnn", epochs=1, batch_size=32, lr=0.1, probes=[],
                    max_train=320, max_test=64)
    a, b = train(c), train(c)
    assert a.status == "completed" and a.final["engine"] == "autograd"
    assert a.final["train_loss"] == b.final["train_loss"]
    assert a.final["train_loss"] < a.epochs[0]["train_loss"]
    out = a.model(torch.zeros(2, 64))
    assert out.shape == (2, 10) and torch.allclose(out.exp().sum(1), torch.ones(2))  # log-probs
    td = get_data(c, torch.device("cpu"))
    w = [build_model(c.model_copy(update={"seed": s}), td).state_dict()["features.0.weight"]
         for s in (0, 0, 1)]
    assert torch.equal(w[0], a.init_state["features.0.weight"]) and torch.equal(w[0], w[1])
    assert not torch.equal(w[0], w[2])
    with pytest.raises(ConfigError, match="fused"):
        train(c.model_copy(update={"engine": "fused"}))


def test_cnn_needs_image_shaped_inputs(mod: str) -> None:
    with pytest.raises(ConfigError, match="not a square image"):
        train(cfg(mod, model="cnn", data=f"{mod}:load_flat"))


@pytest.mark.parametrize("spec, message", [
    ("nosuchmodule_xyz:make", "cannot import 'nosuchmodule_xyz'"),
    ("{m}:nothing", "has no attribute 'nothing'"),
    ("{m}:N", "is not callable"),
    ("{m}:not_a_model", "not a torch.nn.Module"),
    ("{m}:broken", "RuntimeError: disk on fire"),
])
def test_bad_user_model_is_one_line(mod: str, spec: str, message: str) -> None:
    with pytest.raises(BatchlabError, match=message) as e:
        train(cfg(mod, model=spec.format(m=mod)))
    assert "\n" not in str(e.value)


def test_bad_user_data_is_one_line(mod: str) -> None:
    with pytest.raises(DataError, match="pair"):
        train(cfg(mod, data=f"{mod}:not_a_model"))
    with pytest.raises(BatchlabError, match="disk on fire"):
        train(cfg(mod, data=f"{mod}:broken"))


# -- geometry per parameter tensor, curvature, noise on a CNN ---------------------------------
def test_geometry_per_parameter_tensor_on_a_cnn() -> None:
    from batchlab.nn.models import build_cnn
    from batchlab.probes.geometry import geometry, snapshot, weight_layers

    net = build_cnn((1, 8, 8), 3, seed=0)
    init = snapshot(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = geometry(net, init)
    ps = dict(net.named_parameters())
    w = [n for n, p in ps.items() if p.dim() >= 2]
    b = [n for n, p in ps.items() if p.dim() < 2]

    def dist(names):
        return math.sqrt(sum(float((ps[n].detach() - init[n]).double().pow(2).sum()) for n in names))

    assert [n for n, _ in weight_layers(net)] == [f"layer{i}" for i in range(1, 6)]
    assert g["dist_init_w"] == pytest.approx(dist(w), rel=1e-9)
    assert g["dist_init_b"] == pytest.approx(dist(b), rel=1e-9)
    assert g["dist_init_layer1_w"] == pytest.approx(dist(["features.0.weight"]), rel=1e-9)
    w1, w10 = ps["classifier.0.weight"].detach().double(), init["classifier.0.weight"].double()
    assert g["cos_init_layer3"] == pytest.approx(float((w1 * w10).sum() / (w1.norm() * w10.norm())))


def test_layer_groups_curvature_and_noise_scale_on_a_cnn() -> None:
    from batchlab.measure.curvature import hessian_eigenvalues, sharpness
    from batchlab.measure.noise import b_simple, per_example_grads_loop, per_example_sq_norms
    from batchlab.nn.models import build_cnn
    from batchlab.nn.optim import layer_groups

    net = build_cnn((1, 8, 8), 3, seed=0)
    assert len(layer_groups(net)) == 5  # one per conv / linear layer
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 64, generator=g), torch.randint(0, 3, (48,), generator=g)
    per_layer = hessian_eigenvalues(net, (x, y), per_layer=True, max_iter=8, on_fail="ignore")
    assert len(per_layer) == 5 and all(math.isfinite(r.top) for r in per_layer.values())
    assert math.isfinite(sharpness(net, (x, y), epsilon=1e-3).sharpness)
    sq = per_example_sq_norms(net, x, y)  # vmap on a conv net, against one backward each
    ref = per_example_grads_loop(net, x, y).double().pow(2).sum(1)
    assert torch.allclose(sq, ref, rtol=1e-4)
    est = b_simple(net, x, y, n_boot=0)
    assert est.method == "per-example (vmap)" and est.trace_sigma > 0


# -- experiments and CLI ------------------------------------------------------------------------
def test_mlp_specific_experiment_says_so_in_one_line(run_main, mod, tmp_path, capsys) -> None:
    rc = run_main("experiment", "gradient-competition", "--model", "cnn", "--store",
                  tmp_path / "s.db", "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and "built-in MLP only" in err and len(err.strip().splitlines()) == 1


def test_context_passes_model_and_data_only_when_set(mod: str) -> None:
    from batchlab.experiments import Context

    assert Context().config(batch_size=32).key("x") == make_config(dataset="mnist-5k",
                                                                  batch_size=32).key("x")
    c = Context(model=f"{mod}:make", data=f"{mod}:load").config(batch_size=32)
    assert (c.model, c.data) == (f"{mod}:make", f"{mod}:load")


def test_cli_train_and_batch_size_experiment_on_a_user_cnn(run_main, mod, tmp_path, capsys) -> None:
    """The first "done when" of the issue, on a tiny CNN and data in the user's own file."""
    from batchlab.experiments.outputs import load_claims

    store = tmp_path / "s.db"
    args = ["--model", f"{mod}:make", "--data", f"{mod}:load"]
    assert run_main("train", *args, "--batch-size", "64", "--epochs", "1", "--json",
                    "--store", store) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "completed" and doc["config"]["model"] == f"{mod}:make"
    assert "dist_init_layer2_w" in doc["epochs"][-1]
    rc = run_main("experiment", "batch-size", *args, "--set", "epochs=1",
                  "--set", "batch_sizes=[32,128]", "--store", store, "--out", tmp_path / "out")
    assert rc == 0, capsys.readouterr().err
    claims = load_claims(tmp_path / "out" / "batch-size" / "claims.json")
    assert claims and all(c["verdict"] in ("reproduced", "not_reproduced", "inconclusive",
                                           "untestable") for c in claims)
    with Store(store) as st:
        runs = st.runs()
    assert {r.config["batch_size"] for r in runs} == {32, 64, 128}
    assert all(r.config["model"] == f"{mod}:make" for r in runs)


def test_experiment_whose_every_run_failed_exits_non_zero(run_main, mod, tmp_path, capsys):
    """Every run failing inside training is stored as failed; the experiment still writes its
    outputs but exits 1 with one line saying so (and --json gives one error object)."""
    args = ["--model", f"{mod}:flaky", "--data", f"{mod}:load", "--set", "epochs=1",
            "--set", "batch_sizes=[32,128]", "--store", tmp_path / "s.db"]
    rc = run_main("experiment", "batch-size", *args, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 1 and "every one of its" in err and "runs failed" in err
    assert "Traceback" not in err and "internal error" not in err
    rc = run_main("reproduce", "--only", "batch-size", *args, "--out", tmp_path / "out2", "--json")
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert rc == 1 and doc["code"] == 1 and "batch-size: every one" in doc["error"]
    with Store(tmp_path / "s.db") as st:
        assert {r.status for r in st.runs()} == {"failed"}


def test_cli_bad_user_model_fails_before_the_store_is_written(run_main, mod, tmp_path, capsys):
    rc = run_main("train", "--model", f"{mod}:make_other", "--data", f"{mod}:load4",
                  "--store", tmp_path / "s.db", "--epochs", "1")
    assert rc == 0  # a model that fits
    rc = run_main("train", "--model", f"{mod}:not_a_model", "--data", f"{mod}:load",
                  "--store", tmp_path / "t.db")
    err = capsys.readouterr().err
    assert rc == 2 and "not a torch.nn.Module" in err and not (tmp_path / "t.db").exists()


def test_sweep_toml_with_model_and_data(run_main, mod, tmp_path, capsys) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text(textwrap.dedent(f"""
        [base]
        model = "{mod}:make"
        data = "{mod}:load"
        epochs = 1
        lr = 0.1
        [grid]
        batch_size = [32, 64]
    """))
    assert run_main("sweep", grid, "--store", tmp_path / "s.db", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert run_main("sweep", grid, "--store", tmp_path / "s.db", "--json") == 0
    assert all(r["cached"] for r in json.loads(capsys.readouterr().out)["runs"])  # resumed from the store


def test_user_model_reloaded_from_store_matches(mod: str, tmp_path: Path) -> None:
    """Checkpoints of a user-model run load back into a freshly built model (sharpness and
    the other experiments that reload weights do this)."""
    from batchlab.engine.setup import build_model

    res = train(cfg(mod, checkpoint_epochs=[1]), store=tmp_path / "s.db")
    cached = train(cfg(mod, checkpoint_epochs=[1]), store=tmp_path / "s.db")
    c = cached.config
    net = build_model(c, get_data(c, torch.device("cpu")))
    net.load_state_dict(cached.checkpoint(1))
    x = get_data(c, torch.device("cpu")).x_train[:5]
    assert torch.allclose(net(x), res.model(x), atol=1e-6)
    assert isinstance(net, nn.Module)


def test_ray_executor_refuses_user_models_in_one_line(mod: str, tmp_path: Path) -> None:
    from batchlab.runs.executors import run_configs

    with Store(tmp_path / "s.db") as st, pytest.raises(ConfigError, match="--executor local"):
        run_configs([cfg(mod)], st, executor="ray")
