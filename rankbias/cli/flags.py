"""`RunConfig` as command-line flags, generated from its fields: one source for both.

Each field of `rankbias.training.config.RunConfig` becomes one `rankbias train` flag, its type from
the field's annotation and its help from the field's comment in config.py, so a new field
gets its flag and its help without a second edit:

    batch_size: int = 8  # B: ...          ->  --batch-size N      (type int)
    early_stop: bool = True  # ...         ->  --early-stop / --no-early-stop
    schedule: str = "constant"  # ...      ->  --schedule {constant,multistep,cosine}
                                               (choices: config.CHOICES)
    milestones: list[int] | None = None    ->  --milestones 60 100 200
    model_args: dict = ...                 ->  --model-arg KEY=VALUE, repeatable
    tolerances: list[float] = ...          ->  --tol 1e-3 --tol 0.05 (today's spelling)

Unset flags are left out of the parsed arguments (argparse.SUPPRESS), so `--config FILE`
keeps its values; `config_values` merges the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any

from rankbias.training.config import CHOICES, RunConfig, read_yaml
from rankbias.utils import RankbiasError

# List fields given one value per flag, repeated, under a short name (the 0.1 spelling).
REPEATABLE = {"tolerances": "--tol"}


def flag_name(name: str, hint: Any) -> str:
    """`batch_size` -> `--batch-size`; a dict field takes one KEY=VALUE per flag, so its
    flag is singular: `model_args` -> `--model-arg`."""
    if name in REPEATABLE:
        return REPEATABLE[name]
    if _is_mapping(hint):
        name = name.removesuffix("s")
    return "--" + name.replace("_", "-")


def _is_mapping(hint: Any) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def field_help(cls: type) -> dict[str, str]:
    """{field: its comment} from the source of dataclass `cls`: the comment-only lines right
    above the field and the comment at the end of its line, joined ('' when none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokens if t.type == tokenize.COMMENT}
    line_breaks = (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
    code_rows = {row for t in tokens if t.type not in (tokenize.COMMENT, *line_breaks)
                 for row in range(t.start[0], t.end[0] + 1)}
    names = {f.name for f in dataclasses.fields(cls)}
    helps: dict[str, str] = {}
    for previous, token, following in zip(tokens, tokens[1:], tokens[2:]):
        # a field: `name:` first on its line, in the class body (the first such line wins)
        is_field = (token.type == tokenize.NAME and token.string in names
                    and previous.type in (tokenize.COMMENT, *line_breaks)
                    and following.string == ":" and token.string not in helps)
        if is_field:
            row = top = token.start[0]
            while top - 1 in comments and top - 1 not in code_rows:
                top -= 1
            helps[token.string] = " ".join(comments[r] for r in range(top, row + 1)
                                           if r in comments)
    return {name: helps.get(name, "") for name in names}


def _unwrap_optional(hint: Any) -> Any:
    """`list[int] | None` -> `list[int]`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def add_run_flags(group: argparse._ActionsContainer, cls: type = RunConfig) -> None:
    """One flag per field of `cls` on `group`, each stored under the field's name and only
    when given (argparse.SUPPRESS); the help is the field's comment and its default."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        hint = _unwrap_optional(hints[f.name])
        flag = flag_name(f.name, hint)
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)
        how = ""  # how to give the value, when it is not one word
        if hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif _is_mapping(hint):
            kwargs.update(action="append", metavar="KEY=VALUE")
            how = "; KEY=VALUE, repeatable"
        elif typing.get_origin(hint) is list and f.name in REPEATABLE:
            kwargs.update(type=typing.get_args(hint)[0], action="append",
                          metavar=flag.lstrip("-").upper())
            how = "; repeatable"
        elif typing.get_origin(hint) is list:
            kwargs.update(type=typing.get_args(hint)[0], nargs="+")
        else:
            kwargs.update(type=hint, choices=CHOICES.get(f.name))
        text = f"{helps[f.name]}{how} (default: {_shown(_default(f))})"
        group.add_argument(flag, help=text.replace("%", "%%"), **kwargs)


def key_values(pairs: list[str], flag: str) -> dict:
    """['depth=4', 'act=tanh'] -> {'depth': 4, 'act': 'tanh'} (values read as YAML)."""
    import yaml

    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise RankbiasError(f"{flag} takes KEY=VALUE, got {pair!r}")
        values[key] = yaml.safe_load(text)
    return values


def config_values(flags: dict[str, Any], config_file: str | None = None,
                  cls: type = RunConfig) -> dict[str, Any]:
    """The run config's fields: those of `config_file` (YAML), overridden by the flags given
    (`vars(args)` of a parser with `add_run_flags`); KEY=VALUE options are merged into the
    file's mapping."""
    values = (read_yaml(config_file) or {}) if config_file else {}
    if not isinstance(values, dict):
        raise RankbiasError(f"{config_file} must hold a mapping of RunConfig fields")
    hints = typing.get_type_hints(cls)
    for name in (f.name for f in dataclasses.fields(cls)):
        if name not in flags:
            continue
        if _is_mapping(hints[name]):
            values[name] = {**values.get(name, {}),
                            **key_values(flags[name], flag_name(name, dict))}
        else:
            values[name] = flags[name]
    return values
