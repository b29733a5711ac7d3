"""One option name, one meaning: every command's options, walked from the click tree.

The check that would have caught the drift of `--store`/`--quiet`/`--seed` across commands
(each declared per command, with its own help text and type)."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from typing import Any

import pytest
import typer

from batchlab.cli import app


def commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from commands(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def options(cmd: Any) -> Iterator[Any]:
    return (p for p in cmd.params if p.param_type_name == "option" and p.name != "help")


def kind(param: Any) -> tuple[Any, ...]:
    """What a value of the option may be: its type (Optional stripped), choices and range."""
    ann = param.type_descriptor.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) is typing.Union and len(args) == 1:
        ann = args[0]
    choices = tuple(str(getattr(c, "value", c)) for c in param.type_descriptor.choices or ())
    return ann, choices, param.min, param.max


ROOT = typer.main.get_command(app)
ALL = list(commands(ROOT))


def test_an_option_name_has_one_help_text_and_one_type_on_every_command() -> None:
    seen: dict[str, dict[tuple[Any, ...], list[str]]] = {}
    for path, cmd in ALL:
        for p in options(cmd):
            for name in p.opts:
                seen.setdefault(name, {}).setdefault((p.help, kind(p)), []).append(path)
    drift = {name: {str(k)[:120]: v[:3] for k, v in variants.items()}
             for name, variants in seen.items() if len(variants) > 1}
    assert not drift, f"options declared differently on different commands: {drift}"
    shared = [n for n, v in seen.items() if len(next(iter(v.values()))) > 1]
    assert {"--store", "--json", "--quiet", "--seed", "--dataset", "--data-dir"} <= set(shared)


@pytest.mark.parametrize("path", [p for p, _ in ALL])
def test_boolean_flags_show_no_type(path: str) -> None:
    cmd = dict(ALL)[path]
    flags = [p for p in options(cmd) if p.is_flag]
    assert all(p.metavar == "" for p in flags), [p.opts for p in flags if p.metavar != ""]


def test_seed_and_dataset_are_the_same_checked_choice_on_train_and_recommend() -> None:
    from batchlab.config import MAX_SEED
    from batchlab.data import DATASETS

    by = dict(ALL)
    for cmd in ("train", "recommend"):
        ps = {p.name: p for p in options(by[cmd])}
        assert kind(ps["seed"])[2:] == (0, MAX_SEED)
        assert kind(ps["dataset"])[1] == DATASETS


@pytest.mark.parametrize("path", ["data", "runs export", "schedule-preset", "train", "runs list"])
def test_commands_that_print_take_json(path: str) -> None:
    assert any("--json" in p.opts for p in options(dict(ALL)[path]))


def test_experiment_and_reproduce_share_their_options() -> None:
    by = dict(ALL)
    exp = [p.name for p in options(by["experiment batch-size"])]
    rep = [p.name for p in options(by["reproduce"])]
    from batchlab.cli.experiment import COMMON_PARAMS

    common = [n for n, _, _ in COMMON_PARAMS]
    assert exp[:len(common)] == rep[:len(common)] == common


def test_root_help_offers_shell_completion(run_main: Any, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert run_main("--help") == 0
    assert "--install-completion" in capsys.readouterr().out


def test_json_of_data_and_schedule_preset_is_what_they_print(
        run_main: Any, capsys: pytest.CaptureFixture) -> None:
    import json

    assert run_main("data", "digits", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dataset"] == "digits" and doc["train"] > 0 and len(doc["sha256"]) == 64
    assert run_main("schedule-preset", "goyal", "--batch-size", "1024", "--base-batch", "64",
                    "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["preset"] == "goyal" and doc["fields"]["batch_size"] == 1024
    assert run_main("schedule-preset", "goyal", "--batch-size", "0", "--json") == 2
    assert "--batch-size must be >= 1" in json.loads(capsys.readouterr().out)["error"]


def test_every_scalar_train_config_field_is_a_train_flag() -> None:
    """Scalar fields are flags; the others (lists, tuples, dicts) are --config TOML, and
    `train --help` says so."""
    from batchlab.cli.trainflags import scalar_fields
    from batchlab.config import TrainConfig

    flags = {o for p in options(dict(ALL)["train"]) for o in p.opts}
    scalars = scalar_fields()
    assert {"lr", "batch_size", "warmup_epochs", "engine", "nesterov"} <= set(scalars)
    missing = [n for n in scalars if "--" + n.replace("_", "-") not in flags]
    assert not missing, f"TrainConfig fields no train flag reaches: {missing}"
    config_only = sorted(set(TrainConfig.model_fields) - set(scalars))
    assert "hidden" in config_only and "schedule" in config_only
    assert "--config" in flags


def test_generated_train_flags_reach_the_config_and_override_config_toml(
        run_main: Any, capsys: pytest.CaptureFixture, tmp_path: Any) -> None:
    import json

    toml = tmp_path / "c.toml"
    toml.write_text('dataset = "digits"\nhidden = [16]\nepochs = 1\nwarmup_epochs = 2.0\n'
                    'decay = "cosine"\n')
    store = tmp_path / "s.db"
    assert run_main("train", "--config", toml, "--warmup-epochs", "0.5", "--nesterov",
                    "--momentum", "0.9", "--max-train", "200", "--store", store, "--json") == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert (cfg["warmup_epochs"], cfg["nesterov"], cfg["max_train"]) == (0.5, True, 200)
    assert cfg["decay"] == "cosine" and cfg["hidden"] == [16]  # from the TOML, not a flag
    assert run_main("train", "--dataset", "digits", "--epochs", "0", "--engine", "warp",
                    "--store", store) == 2
    assert run_main("train", "--dataset", "digits", "--epochs", "0", "--eps", "0",
                    "--store", store) == 2
    assert "eps" in capsys.readouterr().err


def test_recommend_takes_the_built_in_models_its_model_help_names(
        run_main: Any, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Any) -> None:
    """`--model cnn` (shared help: mlp, cnn or module:factory) builds the CNN on recommend too
    (it used to be read as module:factory and refused)."""
    import json

    from batchlab.cli import recommend as cmd

    def fake(net: Any, td: Any, **kw: Any) -> dict[str, Any]:
        return {"net": type(net).__name__, "convs": sum("Conv" in type(m).__name__ for m in net.modules())}

    monkeypatch.setattr(cmd, "recommend", fake)
    assert run_main("recommend", "--dataset", "digits", "--model", "cnn", "--quiet", "--json",
                    "--store", tmp_path / "s.db", "--out", tmp_path / "o") == 0
    assert json.loads(capsys.readouterr().out)["convs"] > 0
