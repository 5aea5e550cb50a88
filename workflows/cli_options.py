"""Command-line options derived from a task's pydantic config, so each setting is declared once.

`derive_options(Model)` wraps a typer command that takes a `cfg` parameter. Typer sees, in place of
`cfg`, one `--field-name` option per field of Model: its type from the annotation, its default and
its help from the field. The command receives `cfg`, the Model built from only the options the user
gave, so the model's own defaults and validators apply and `cfg.model_dump(exclude_unset=True)` is
what was asked for. A hand-written parameter named like a field (tokenize's positional DATA) fills
that field instead of getting an option.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, NoReturn, Optional, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError

from slimmoe.workflows.config import describe_error


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class DerivedOptions:
    """What a derived command was built from; kept on the command so tests can check it against the model."""

    model: type[BaseModel]
    hidden: tuple = ()
    aliases: dict = field(default_factory=dict)  # "--alias" -> field name
    parse: dict = field(default_factory=dict)  # field -> function of the CLI value, before the model sees it
    help: dict = field(default_factory=dict)  # field -> help text where the CLI spells a value differently

    def named_fields(self) -> set[str]:
        return {*self.hidden, *self.aliases.values(), *self.parse, *self.help}


def fail_validation(err: ValidationError, model: type[BaseModel], names: dict[str, str]) -> NoReturn:
    """One line per pydantic error, naming the option; exit 2 (a usage error, no traceback)."""
    for e in err.errors(include_url=False):
        loc = e.get("loc", ())
        where = f"{names.get(loc[0], option_name(str(loc[0])))}: " if loc else ""
        typer.secho(f"error: {where}{describe_error(e, model)}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _option(name: str, info, aliases: list[str], help_text: Optional[str]) -> inspect.Parameter:
    kind = _without_none(info.annotation)
    default = ... if info.is_required() else info.get_default(call_default_factory=True)
    help_text = help_text or info.description
    decls = [option_name(name), *aliases]
    if get_origin(kind) is list and get_args(kind)[0] in (int, float, str):
        # A comma-separated string: one option value, the way `--bits 1,2,3` was always written.
        kind = str
        help_text = f"{help_text} (comma-separated)" if help_text else "comma-separated"
        if default is not ...:
            default = ",".join(map(str, default)) or None
    elif kind is bool:
        decls[0] += f"/--no-{name.replace('_', '-')}"
    elif get_origin(kind) in (Union, types.UnionType) and all(
            a in (int, float, str) or get_origin(a) is Literal for a in get_args(kind)):
        kind = str  # e.g. `2` or `auto`: the model converts and checks the string
    elif kind not in (int, float, str) and get_origin(kind) is not Literal:
        raise TypeError(f"{name}: {info.annotation} has no command-line form; hide the field or give it a simpler type")
    annotation = Optional[kind] if default is None else kind
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *decls, help=help_text))


def _hand_written_name(name: str, info) -> str:
    if isinstance(info, typer.models.ArgumentInfo):
        return info.metavar or name.upper()
    decls = getattr(info, "param_decls", None)
    return decls[0] if decls else option_name(name)


def _split(value: str) -> list[str]:
    # The model converts the items, so a bad one is a validation error naming the option.
    return [item.strip() for item in value.split(",") if item.strip()]


def derive_options(model: type[BaseModel], *, hidden: tuple = (), aliases: Optional[dict[str, str]] = None,
                   parse: Optional[dict[str, Callable[[Any], Any]]] = None,
                   help: Optional[dict[str, str]] = None) -> Callable:
    """Decorate a typer command taking `cfg: model`. `hidden`: fields left off the command line (they
    keep the model's default); `aliases`: {"--old-name": field}; `parse`: {field: function} applied
    to the command-line value; `help`: {field: text} where the command line spells a value differently."""
    spec = DerivedOptions(model, tuple(hidden), dict(aliases or {}), dict(parse or {}), dict(help or {}))
    unknown = spec.named_fields() - model.model_fields.keys()
    if unknown:  # a renamed field must not silently drop an alias or unhide a setting
        raise TypeError(f"{model.__name__} has no field(s) {', '.join(sorted(unknown))}")
    required = [n for n in spec.hidden if model.model_fields[n].is_required()]
    if required:
        raise TypeError(f"{model.__name__}: hidden field(s) {', '.join(required)} are required")

    def decorate(fn: Callable) -> Callable:
        by_hand = {n: p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                   for n, p in inspect.signature(fn, eval_str=True).parameters.items() if n != "cfg"}
        lists = {n for n, f in model.model_fields.items() if get_origin(_without_none(f.annotation)) is list}
        derived = [_option(n, f, [a for a, target in spec.aliases.items() if target == n], spec.help.get(n))
                   for n, f in model.model_fields.items() if n not in spec.hidden and n not in by_hand]
        on_cli = [p.name for p in derived] + [n for n in by_hand if n in model.model_fields]
        names = {n: _hand_written_name(n, by_hand[n].default) for n in on_cli if n in by_hand}

        @functools.wraps(fn)
        def command(_ctx: typer.Context, **kwargs):
            values = {}
            for name in on_cli:
                value = kwargs[name] if name in by_hand else kwargs.pop(name)
                source = _ctx.get_parameter_source(name)
                # Left out when not given: the model's default applies and the field stays unset.
                # (typer bundles its own click, so its ParameterSource is compared by name.)
                if source is None or source.name == "DEFAULT":
                    continue
                if name in lists and isinstance(value, str):
                    value = _split(value)
                values[name] = spec.parse[name](value) if name in spec.parse else value
            try:
                cfg = model(**values)
            except ValidationError as err:
                fail_validation(err, model, names)
            return fn(cfg=cfg, **kwargs)

        params = [*by_hand.values(), *derived,
                  inspect.Parameter("_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.derived_options = spec
        return command

    return decorate
