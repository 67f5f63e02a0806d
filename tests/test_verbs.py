"""Every verb defined once (pipelines/verbs.py): the command line and recipe stages take the same options under
the same names and defaults; a misspelt stage option fails before anything runs; a bug inside a stage is an
internal error, never an option error."""

from __future__ import annotations

import argparse

import pytest
import yaml

from megatron_prune import cli
from megatron_prune.pipelines.verbs import CLI, RECIPE, RECIPE_VERBS, VERBS


def _subparsers():
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_the_parsers_are_the_table():
    """Every verb is a subcommand whose options are exactly the verb's command-line options, with their defaults."""
    subs = _subparsers()
    assert list(subs) == list(VERBS)
    for name, verb in VERBS.items():
        actions = {a.dest: a for a in subs[name]._actions if not isinstance(a, argparse._HelpAction)}
        assert list(actions) == [o.name for o in verb.cli_options()], name
        for option in verb.cli_options():
            assert actions[option.name].default == option.default, (name, option.name)


def test_a_recipe_stage_takes_the_verbs_options_under_the_same_names_and_defaults():
    for name in RECIPE_VERBS:
        verb = VERBS[name]
        recipe = verb.recipe_options()
        cli_names = {o.name for o in verb.cli_options()}
        for option in verb.options:
            if option.where == CLI or option.name in ("tp", "pp"):  # tp/pp: stage keys
                assert option.name not in recipe, (name, option.name)
            else:
                assert recipe[option.name].default == option.default, (name, option.name)
        # what is only on one side is marked so in the table, never renamed (samples stays samples)
        assert {o.name for o in verb.options if o.where == RECIPE} == set(recipe) - cli_names, name
    assert "samples" in VERBS["importance"].recipe_options() and "lm_loss_drop" in VERBS["importance"].recipe_options()


def _recipe(tmp_path, stages: dict):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return path


def test_a_misspelt_stage_option_fails_the_dry_run_naming_the_closest(tmp_path, capsys):
    path = _recipe(tmp_path, {
        "teacher": {"verb": "convert", "src": "hf"},
        "pruned": {"verb": "prune", "ckpt": "teacher", "scores": "s", "target": "hidden=32", "tragets": 3}})
    assert cli.main(["run", str(path), "--dry-run", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megatron-prune run: error: {path}: stage 'pruned' (prune): unknown option 'tragets'; "
                   "did you mean 'target'?"]
    assert not (tmp_path / "w").exists()

    # inside a mapping option, through --set, and with no close name
    path = _recipe(tmp_path, {"s": {"verb": "search", "ckpt": "c", "scores": "s", "valid_data": "v", "params": "1M",
                                    "distill": {"data": ["d"], "step": 2}}})
    assert cli.main(["run", str(path), "--dry-run", "--workdir", str(tmp_path / "w")]) == 2
    assert "stage 's' (search): unknown option distill.step; did you mean 'steps'?" in capsys.readouterr().err
    assert cli.main(["run", str(path), "--dry-run", "--set", "s.distill={data: [d], steps: 2}", "--set",
                     "s.top_kk=4"]) == 2
    assert "unknown option 'top_kk'; did you mean 'top_k'?" in capsys.readouterr().err
    assert cli.main(["run", str(path), "--dry-run", "--set", "s.distill={data: [d]}", "--set", "s.zzz=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'zzz'; the options of this verb are active_params, candidate, ckpt, " in err
    # an option that exists only on the command line is not a recipe option
    path = _recipe(tmp_path, {"e": {"verb": "eval", "models": ["m"], "data": "d", "ckpt": "m"}})
    assert cli.main(["run", str(path), "--dry-run"]) == 2
    assert "stage 'e' (eval): unknown option 'ckpt'" in capsys.readouterr().err
    path = _recipe(tmp_path, {"e": {"verb": "eval", "data": "d"}})
    assert cli.main(["run", str(path), "--dry-run"]) == 2
    assert "stage 'e' (eval) needs `models:`" in capsys.readouterr().err


def test_a_type_error_inside_a_stage_is_an_internal_error(tmp_path, capsys, monkeypatch):
    """Not an option error (exit 2, and the traceback dropped even with --debug) as run_stage once reported it."""
    import megatron_prune.pipelines.convert as convert_module

    def deep_in_the_stage(*args, **kwargs):
        return _bug()

    monkeypatch.setattr(convert_module, "convert", deep_in_the_stage)
    path = _recipe(tmp_path, {"teacher": {"verb": "convert", "src": "hf", "dtype": "float32"}})
    argv = ["run", str(path), "--workdir", str(tmp_path / "w")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["megatron-prune run: internal error: TypeError: unsupported operand type(s) for +: 'int' and "
                   "'str' (run again with --debug for the traceback)"]
    with pytest.raises(TypeError) as raised:
        cli.main(["--debug", *argv])
    assert raised.traceback[-1].name == "_bug" and "deep_in_the_stage" in [entry.name for entry in raised.traceback]
    events = [yaml.safe_load(line) for line in (tmp_path / "w" / "run_log.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "failed" and events[-1]["error"].startswith("TypeError")


def _bug():
    return 1 + "1"
