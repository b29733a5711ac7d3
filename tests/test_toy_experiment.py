"""A new experiment is one declaration: this file is the whole of one (options, the work it
needs, what it makes of the results, its finding), registered with `register_experiment` and
then run end to end and planned like the built-in ones - nothing else in batchlab names it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchlab.errors import ConfigError
from batchlab.experiments import (
    Context,
    Experiment,
    Output,
    Results,
    Work,
    get,
    register_experiment,
    run_experiment,
    unregister_experiment,
)
from batchlab.experiments.accuracies import accuracy_difference, bits_to_array
from batchlab.experiments.claims import Claim, check_document
from batchlab.experiments.option_defaults import opt, preset
from batchlab.experiments.options import Options
from batchlab.experiments.verdicts import above
from batchlab.runs.store import Store

# ---- the experiment: everything it needs -------------------------------------------------


class ToyOptions(Options):
    small: int | None = opt("the small batch size", preset(8, 32))
    large: int | None = opt("the large batch size", preset(256, 1024))
    epochs: int | None = opt("epochs per run (equal epochs: the large batch takes fewer steps)",
                             preset(1, 5))


def toy_units(ctx: Context) -> Work:
    """The small and the large batch at one lr, every seed: a training run each."""
    o: ToyOptions = ctx.opts
    if o.small >= o.large:
        raise ConfigError("small must be below large")
    runs = [ctx.config(batch_size=b, lr=0.05, epochs=o.epochs, seed=s)
            for b in (o.small, o.large) for s in ctx.seed_list]
    return Work("toy", runs=runs)


def toy_analyze(ctx: Context, results: Results) -> Output:
    o: ToyOptions = ctx.opts
    n = len(ctx.seed_list)
    small, large = results.runs[:n], results.runs[n:]
    n_test = ctx.test_size()

    def arm(runs: list) -> tuple[list[float], list]:
        return ([r.final["test_acc"] for r in runs],
                [bits_to_array(r.final.get("test_correct_bits"), n_test) for r in runs])

    (acc_s, bits_s), (acc_l, bits_l) = arm(small), arm(large)
    claim = Claim("toy-small-batch-wins", "R90",
                  f"at equal epochs batch {o.small} is more accurate than batch {o.large}",
                  accuracy_difference(acc_s, acc_l, n_test, correct_a=bits_s, correct_b=bits_l),
                  above(0.0), f"test accuracy at batch {o.small} minus at {o.large}, paired",
                  {"test_acc small": acc_s, "test_acc large": acc_l}, primary=True)
    rows = [{"batch_size": r.config.batch_size, "seed": r.config.seed,
             "test_acc": r.final["test_acc"]} for r in results.runs]
    return Output(rows=rows, summary=f"{len(rows)} runs", claims=[claim])


TOY = Experiment("toy", "Toy: small vs large batch at equal epochs", toy_units, toy_analyze,
                 options=ToyOptions,
                 findings={"R90": "toy: a small batch beats a large one at equal epochs"})

# ---- the tests ---------------------------------------------------------------------------


@pytest.fixture
def toy() -> Iterator[Experiment]:
    register_experiment(TOY)
    try:
        yield TOY
    finally:
        unregister_experiment(TOY.name)


def test_a_registered_experiment_runs_end_to_end_and_is_planned(toy, tmp_path: Path) -> None:
    from batchlab.experiments import findings
    from batchlab.experiments.plan import make_plan

    assert get("toy") is toy and findings.FINDINGS["R90"].startswith("toy")
    with Store(tmp_path / "runs.db") as st:
        def ctx(**opts: object) -> Context:
            return Context(preset="quick", seeds=2, out_dir=tmp_path / "out", store=st,
                           options={"hidden": [16], "dataset": "digits", **opts})

        before = make_plan([("toy", ctx())], 0.01).to_json()["experiments"][0]
        assert (before["runs"], before["runs_stored"]) == (4, 0) and before["sgd_steps"] > 0
        output, path = run_experiment("toy", ctx())
        after = make_plan([("toy", ctx())], 0.01).to_json()["experiments"][0]
        assert (after["runs"], after["runs_stored"]) == (0, 4)
        with pytest.raises(ConfigError, match="unknown option 'smal'"):
            run_experiment("toy", ctx(smal=3))  # its options are validated as declared
    doc = json.loads((path / "claims.json").read_text())
    assert check_document(doc) == []
    assert [c["finding"] for c in doc["claims"]] == ["R90"]
    assert len(output.rows) == 4 and {r["batch_size"] for r in output.rows} == {8, 256}


def test_registering_twice_or_a_taken_finding_is_refused(toy) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_experiment(TOY)
    with pytest.raises(ConfigError, match="already registered"):
        register_experiment(Experiment("batch-size", "x", toy_units, toy_analyze))
    with pytest.raises(ConfigError, match="finding S1 is already"):
        register_experiment(Experiment("toy2", "x", toy_units, toy_analyze,
                                       findings={"S1": "something else"}))


def test_an_installed_package_adds_an_experiment_to_the_cli(tmp_path: Path) -> None:
    """Another package declares the experiment under the `batchlab.experiments` entry-point
    group: the CLI lists it, runs it and `reproduce --only` takes it, with no change to
    batchlab; a broken entry point is one warning line, and every other command still works."""
    import os
    import subprocess
    import sys

    (tmp_path / "toyplug.py").write_text("from test_toy_experiment import TOY as EXPERIMENT\n")
    info = tmp_path / "toyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[batchlab.experiments]\ntoy = toyplug:EXPERIMENT\nbroken = toyplug:NO_SUCH_NAME\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "batchlab", *args], capture_output=True,
                              text=True, env=env, timeout=600)

    listed = cli("experiment", "list", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "toy" in json.loads(listed.stdout)["experiments"]
    warning = [ln for ln in listed.stderr.splitlines() if "broken" in ln]
    assert len(warning) == 1 and "not loaded" in warning[0] and "Traceback" not in listed.stderr
    common = ["--seeds", "2", "--set", "hidden=[16]", "--set", "dataset=digits", "--json",
              "--quiet", "--store", str(tmp_path / "s.db")]
    run = cli("experiment", "toy", *common, "--out", str(tmp_path / "one"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert [c["finding"] for c in json.loads(run.stdout)["claims"]] == ["R90"]
    both = cli("reproduce", "--only", "toy", *common, "--out", str(tmp_path / "all"))
    assert both.returncode == 0, both.stderr[-2000:]
    assert json.loads((tmp_path / "all" / "claims.json").read_text())["claims"][0]["finding"] == "R90"
