"""Sweeps: a TOML grid expanded into run configs, executed resumably through the store.

    [base]
    dataset = "mnist"
    epochs = 1
    [grid]
    batch_size = [64, 256]
    lr = [0.01, 0.1]
    seed = [0]

The Cartesian product of `[grid]` over `[base]` (grid keys in sorted order, values in listed
order) gives the runs. Finished runs (same config hash) are skipped, so an interrupted sweep
resumes where it stopped. Execution goes through an executor (`local` here; `ray` in
`batchlab.runs.executors`), and only this process ever writes the store.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from batchlab.config import TrainConfig, make_config
from batchlab.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


MAX_CELLS = 100_000


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A TOML file as a dict; any unreadable file (missing, a folder, not UTF-8, bad TOML) is
    one ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} file {path} is a directory; give a TOML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} file {path} is not UTF-8 text (byte {e.start}); save it as "
                          f"UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed TOML in {path}: {e}") from None


def load_grid(path: str | Path) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The `[base]` table and the `[grid]` table of lists of a sweep file, checked."""
    doc = read_toml(path, "sweep")
    unknown = set(doc) - {"base", "grid"}
    if unknown:
        raise ConfigError(f"{path}: unknown tables {sorted(unknown)}; put train fields in a "
                          f"'base' table and lists in a 'grid' table")
    base = doc.get("base", {})
    grid = doc.get("grid", {})
    for name, table in (("base", base), ("grid", grid)):
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{name}' must be a table ([{name}] with key = value "
                              f"lines), not {type(table).__name__} {table!r}"[:300])
    if not base and not grid:
        raise ConfigError(f"{path} defines no runs: give a 'base' table of train fields and/or "
                          f"a 'grid' table of lists")
    cells = 1
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: grid.{k} must be a non-empty list")
        cells *= len(v)
    if cells > MAX_CELLS:
        raise ConfigError(f"{path}: the grid has {cells} cells; at most {MAX_CELLS} per sweep")
    return base, grid


def expand(base: dict[str, Any], grid: dict[str, list[Any]]) -> list[TrainConfig]:
    """All configs of the grid, validated up front (a bad cell fails before anything runs)."""
    keys = sorted(grid)
    configs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        fields = {**base, **dict(zip(keys, values))}
        configs.append(make_config(**fields))
    seen: set[str] = set()
    unique = []
    for c in configs:
        k = c.model_dump_json()
        if k not in seen:
            seen.add(k)
            unique.append(c)
    return unique


def validate_against_data(configs: Iterable[TrainConfig]) -> None:
    """Check dataset availability and batch sizes for every config, and that a user's model
    takes the data, before running any (so bad input fails before the store is touched)."""
    from batchlab.data import load_dataset
    from batchlab.data.tensors import load_user
    from batchlab.task import objective_for

    checked: set[tuple[str, str | None]] = set()
    for c in configs:
        if c.data is None and c.loss != "cross_entropy":
            raise ConfigError(f"loss {c.loss} needs your data (data = \"module:loader\"): the "
                              f"built-in datasets are classification")
        if c.data is not None:
            raw = load_user(c.data, objective=objective_for(c.loss), max_train=c.max_train,
                            max_test=c.max_test)
        else:
            raw = load_dataset(c.dataset, c.data_dir)
        n_all = raw.n_train if getattr(raw, "streamed", False) else len(raw.y_train)
        if n_all is None:  # a stream of unknown length: nothing to check the batch size against
            n_all = 1 << 62
        n = n_all if c.max_train is None else min(c.max_train, n_all)
        n = int(round(n * (1 - c.val_fraction)))
        for bs in c.batch_sizes():
            if bs > n:
                raise ConfigError(f"batch size {bs} is larger than the {c.data or c.dataset} training "
                                  f"set ({n})")
        if not c.builtin_model and (c.model, c.data) not in checked:
            from batchlab.engine.setup import build_model, get_data, resolve_device

            build_model(c, get_data(c, resolve_device(c.device)))
            checked.add((c.model, c.data))
