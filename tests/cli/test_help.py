"""`uembed COMMAND --help` as a user reads it: every option explained, one group per title, and every default shown
as it would be typed, equal to what the parser really uses when the option is left out."""

import argparse
import re

import pytest

from uembed.cli import build_parser


def parsers(parser: argparse.ArgumentParser, name: str = "uembed"):
    """Every parser of the command line, subcommands of subcommands too (`uembed data synth`)."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from parsers(sub, f"{name} {command}")


PARSERS = dict(parsers(build_parser()))


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help text as printed, before it is wrapped into lines."""
    return parser._get_formatter()._expand_help(action)


def typed(action: argparse.Action, text: str):
    """What the parser makes of ``text`` given to the option on the command line."""
    value = action.type(text) if action.type else text
    if action.choices is not None:
        assert value in action.choices, (action.dest, text)
    return value


def test_the_walk_reaches_every_command():
    assert {"uembed train", "uembed export", "uembed serve", "uembed data synth", "uembed study"} <= set(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_option_has_help_and_each_group_title_appears_once(name):
    parser = PARSERS[name]
    assert parser.format_help()
    silent = [a.option_strings[0] for a in options(parser) if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert not silent, f"{name}: options without help: {silent}"
    titles = [group.title for group in parser._action_groups if group._group_actions]
    assert len(titles) == len(set(titles)), f"{name}: group titles repeated: {titles}"


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_default_shown_is_what_the_parser_uses(name):
    parser = PARSERS[name]
    for action in options(parser):
        text = help_of(parser, action)
        assert "(default: None)" not in text and not re.search(r"\(default: \(.*,\)\)", text), (name, text)
        shown = re.findall(r"\(default: ([^()]*?)\)", text)
        if action.nargs == 0:  # a flag: its default is the flag's absence, never True or False
            assert not re.search(r"\(default: (True|False)\)", text), (name, text)
            continue
        if action.default in (None, [], ()):  # an unset option: its help says in words what applies instead
            continue
        assert shown, f"{name} {action.option_strings[0]}: default {action.default!r} not shown"
        if action.nargs in ("+", "*"):  # typed as several arguments
            value = [typed(action, part) for part in shown[-1].split()]
        else:
            value = typed(action, shown[-1])
        assert value == action.default, (name, action.option_strings[0], shown[-1], action.default)


def test_train_help_groups_the_streaming_and_row_update_options_apart():
    parser = PARSERS["uembed train"]
    group_of = {a.option_strings[0]: g.title for g in parser._action_groups for a in g._group_actions if a.option_strings}
    streaming = {group_of[o] for o in ("--stream", "--format", "--shuffle-buffer", "--embedding-optimizer", "--stats")}
    updates = {group_of[o] for o in ("--continue-from", "--publish-updates", "--bundle", "--redis-url", "--max-entries")}
    assert len(streaming) == 1 and streaming.pop().startswith("streaming")
    assert len(updates) == 1 and "row updates" in updates.pop()
    assert "MovieLens:" not in help_of(parser, next(a for a in options(parser) if a.dest == "label_threshold"))


def test_export_help_states_no_ratio_the_export_contradicts():
    dtype = next(a for a in options(PARSERS["uembed export"]) if a.dest == "dtype")
    assert "quarters" not in dtype.help and "int8" in dtype.help  # int8 keeps a scale and offset per row too
