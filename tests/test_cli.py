"""The CLI against the library: every config field is an option with the library's default."""

import dataclasses
import inspect

import pytest

from polyprune import cli_prune, cli_train
from polyprune.cli import COMMAND_ORDER, app
from polyprune.pruning.config import PruneConfig
from polyprune.train import TrainConfig

# config fields the CLI sets itself (not options): `progress` comes from --quiet / --json -
NOT_OPTIONS = {"progress"}
CLI_NAMES = {"ids_file": "ids"}  # config field -> its option's parameter, where the option reads better


def _defaults(config: type) -> dict[str, object]:
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = inspect.Parameter.empty  # required
    return out


def _same(a: object, b: object) -> bool:
    empty = (None, [], ())
    return a == b or (a in empty and b in empty)


@pytest.mark.parametrize(
    ("command", "config"), [(cli_prune.prune, PruneConfig), (cli_train.train, TrainConfig)]
)
def test_every_config_field_is_an_option_with_the_same_default(command, config):
    params = inspect.signature(command).parameters
    fields = {CLI_NAMES.get(k, k): v for k, v in _defaults(config).items()}
    missing = sorted(set(fields) - set(params) - NOT_OPTIONS)
    assert not missing, f"{config.__name__} fields without a {command.__name__} option: {missing}"
    differ = {
        k: (v, params[k].default)
        for k, v in fields.items()
        if k in params and v is not inspect.Parameter.empty and not _same(v, params[k].default)
    }
    assert not differ, f"defaults differ (config, CLI): {differ}"


def test_help_lists_the_commands_in_work_order():
    assert [c.name or c.callback.__name__ for c in app.registered_commands] == list(COMMAND_ORDER)
