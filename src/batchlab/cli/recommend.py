"""`batchlab recommend`: the command around `batchlab.recommend.recommend`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from batchlab.cli.boundary import emit_json
from batchlab.cli.options import (
    AmpOpt,
    BatchSizeOpt,
    DataDirOpt,
    DataOpt,
    DatasetOpt,
    DeviceOpt,
    EpochsOpt,
    JsonOpt,
    LossOpt,
    LrOpt,
    MaxBatchOpt,
    ModelOpt,
    OptimizerOpt,
    OutOpt,
    QuietOpt,
    SeedOpt,
    StoreOpt,
)
from batchlab.cli.runs import check_store_folder
from batchlab.data.tensors import tensor_data
from batchlab.errors import BatchlabError, DataError
from batchlab.recommend import recommend
from batchlab.recommend.run import check_settings
from batchlab.runs.store import DEFAULT_STORE, Store
from batchlab.usercode import BUILTIN_MODELS, check_model_on_data, user_data, user_model


class StageProgress:
    """Renders `recommend`'s progress(stage, done, total) callbacks: one transient line per
    stage on stderr, a bar where the stage has a count."""

    def __init__(self) -> None:
        self.prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TimeElapsedColumn(),
                             console=Console(stderr=True), transient=True)
        self.stage: str | None = None
        self.task: Any = None

    def __call__(self, stage: str, done: int | None, total: int | None) -> None:
        if stage != self.stage:
            if self.task is not None:
                self.prog.remove_task(self.task)
            self.stage = stage
            self.task = self.prog.add_task(stage, total=total)
        self.prog.update(self.task, completed=done or 0, total=total)

    def __enter__(self) -> StageProgress:
        self.prog.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.prog.stop()


def register(app: typer.Typer) -> None:
    @app.command("recommend")
    def recommend_cmd(
        dataset: DatasetOpt = "mnist-5k",
        data_dir: DataDirOpt = None,
        model: ModelOpt = None,
        data: DataOpt = None,
        hidden: Annotated[Optional[str], typer.Option(help="Built-in MLP widths, e.g. 1024,1024.")] = None,
        batch_size: BatchSizeOpt = 128,
        lr: LrOpt = 0.1,
        lr_search: Annotated[bool, typer.Option("--lr-search/--no-lr-search", metavar="", help="Search the lr at --batch-size in factors of 2 (fewest steps to the measurement run's loss).")] = True,
        epochs: EpochsOpt = None,
        thorough: Annotated[bool, typer.Option("--thorough", metavar="", help="Also run a small steps-to-target sweep.")] = False,
        max_batch: MaxBatchOpt = 8192,
        out: OutOpt = Path("out/recommend"),
        device: DeviceOpt = "auto",
        store: StoreOpt = Path(DEFAULT_STORE),
        seed: SeedOpt = 0,
        optimizer: OptimizerOpt = "sgd",
        loss: LossOpt = "cross_entropy",
        amp: AmpOpt = "off",
        as_json: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Measure the gradient noise scale and throughput; recommend a batch size and lr."""
        from batchlab.config import make_config
        from batchlab.engine.setup import build_model, get_data, resolve_device

        # settings no measurement can come from are refused before any data is loaded
        check_settings(base_batch=batch_size, base_lr=lr, epochs=epochs, max_batch=max_batch,
                       seed=seed, n=max(batch_size, 4))
        from batchlab.atomic import check_output_dir

        check_output_dir(out, "--out", ("recommend.png", "recommend.json"), stores=(store,))
        dev = resolve_device(device)
        check_store_folder(store)
        widths = _widths(hidden)
        torch.manual_seed(seed)
        from batchlab.data.stream import is_source
        from batchlab.task import Classification, Data
        from batchlab.usercode import user_output

        out_obj = user_output(data) if data is not None else None
        # another loss, a streamed source or a built-in model (--model cnn): the engine's setup
        task = (loss != "cross_entropy" or isinstance(out_obj, Data) or is_source(out_obj)
                or model in BUILTIN_MODELS)
        if data is not None and not task:
            x, y, *test = user_data(data, Classification(), out_obj)  # test: [X_test, y_test]
        else:
            test = []
        if task:  # another loss or a streamed source: the engine's data and model setup
            cfg = make_config(dataset=dataset, data_dir=data_dir, data=data, model=model or "mlp",
                              loss=loss, seed=seed, device=device,
                              **({"hidden": widths} if widths else {}))
            td = get_data(cfg, dev)  # a stream stays a stream: never loaded whole
            net = build_model(cfg, td)
            name = model or f"mlp {cfg.hidden}"
        elif model is not None:
            net = user_model(model)
            if data is None:
                td0 = get_data(make_config(dataset=dataset, data_dir=data_dir), dev)
                x, y = td0.x_train.cpu(), td0.y_train.cpu()
            c = check_model_on_data(net, x, y, Classification())
            net = nn.Sequential(net, nn.LogSoftmax(dim=-1))  # logits or log-probs alike
            td = tensor_data(x, y, c, dev, seed, test=test)
            name = model
        elif data is not None:
            from batchlab.nn.models import build_mlp

            c = int(y.max()) + 1
            if c < 2:
                raise DataError("y must contain at least two classes")
            x = x.reshape(len(x), -1)
            test = [test[0].reshape(len(test[0]), -1), test[1]] if test else []
            td = tensor_data(x, y, c, dev, seed, test=test)
            net = build_mlp(td.input_dim, widths or [1024, 1024], c, seed=seed)
            name = "mlp"
        else:
            cfg = make_config(dataset=dataset, data_dir=data_dir, seed=seed,
                              **({"hidden": widths} if widths else {}))
            td = get_data(cfg, dev)
            net = build_model(cfg, td)
            name = f"mlp {cfg.hidden} on {dataset}"
        if td.n_train is not None and batch_size > td.n_train:
            why = (" (--data keeps 10% as the test set)" if data is not None and not test
                   else "")
            raise BatchlabError(f"--batch-size {batch_size} exceeds the {td.n_train} training "
                                f"examples{why}")
        kw: dict[str, Any] = dict(device=dev, base_batch=batch_size, base_lr=lr, epochs=epochs,
                                  thorough=thorough, seed=seed, out_dir=out, model_name=name,
                                  max_batch=max_batch, tune_lr=lr_search, optimizer=optimizer,
                                  objective=loss, amp=amp)
        with Store(store) as st:
            if quiet:
                rep = recommend(net, td, store=st, **kw)
            else:
                with StageProgress() as show:
                    rep = recommend(net, td, store=st, progress=show, **kw)
        if as_json:
            emit_json(rep)
        else:
            _print(rep)



def _print(rep: dict[str, Any]) -> None:
    out = Console()
    ns = rep["noise_scale"]
    ci = ns["ci"]
    t = Table(title="batchlab recommend", show_header=False)
    t.add_row("batch size (time on this device)", str(rep["recommended_batch_size"]))
    t.add_row("batch size (compute, <=10% extra examples)", str(rep["recommended_batch_size_compute"]))
    t.add_row("learning rate", f"{rep['recommended_lr']:.4g}  [{rep['lr_rule']}]")
    if rep.get("optimizer"):
        t.add_row("optimizer assumed", rep.get("optimizer_note") or rep["optimizer"])
    if rep.get("lr_search"):
        ls = rep["lr_search"]
        t.add_row(f"lr at batch {rep['evidence']['measurement_run']['batch_size']} (line search)",
                  f"{ls['lr']:.4g}: {ls['steps']:.0f} steps to the measurement run's loss "
                  f"({len(ls['runs'])} lrs tried)")
    t.add_row("critical batch size", f"{rep['critical_batch_size']:.4g}  ({rep['critical_batch_size_source']})")
    t.add_row("B_simple (late measurement run, averaged)",
              f"{ns['b_simple']:.4g}  95% CI [{_f(ci[0])}, {_f(ci[1])}] over {ns['n']} iterates")
    fp = ns["final_point"]
    t.add_row("B_simple (final weights only)",
              f"{_f(fp['b_simple'])}  95% CI [{_f(fp['ci'][0])}, {_f(fp['ci'][1])}], {fp['n']} examples")
    t.add_row("B_simple two-batch estimator", f"{_f(ns['two_batch']['b_simple'])}  CI "
              f"[{_f(ns['two_batch']['ci'][0])}, {_f(ns['two_batch']['ci'][1])}]")
    if ns.get("b_noise"):
        t.add_row("B_noise (Hessian)", _f(ns["b_noise"]["b_noise"]))
    t.add_row("predicted steps / time", f"{rep['predicted_steps']:.0f} steps, {rep['predicted_seconds']:.3g} s "
              f"to {rep['target']}")
    if rep.get("measured_steps") is not None:
        t.add_row("measured steps at the recommendation", f"{rep['measured_steps']:.0f} (lr search "
                  f"at batch {rep['recommended_batch_size']})")
    if rep["evidence"].get("figure"):
        t.add_row("figure", rep["evidence"]["figure"])
    out.print(t)


def _f(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "n/a"


def _widths(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    items = spec.split(",")
    if any(not v.strip() for v in items):
        raise BatchlabError(f"--hidden expects comma-separated integers with none empty, got "
                            f"{spec[:80]!r}")
    try:
        w = [int(v) for v in items]
    except ValueError:
        raise BatchlabError(f"--hidden expects comma-separated integers, got {spec[:80]!r}") from None
    if not w or any(v <= 0 for v in w):
        raise BatchlabError(f"--hidden expects positive widths, got {spec!r}")
    return w
