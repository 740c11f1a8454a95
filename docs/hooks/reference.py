"""MkDocs hook: the reference pages, generated from the code at every build.

The pages under ``reference/`` are not files in the repository: this hook renders them
from the four modules that define what they describe, so they cannot drift from the code.

- ``reference/columns.md``: ``operators.schema`` (``output_schema``, ``COLUMN_DOCS``,
  ``IMAGE_STATUSES``, ``REJECT_REASONS``);
- ``reference/config.md``: ``pipelines.config.PipelineConfig`` and its nested models;
- ``reference/cli.md``: ``jobs.cli.parser()``;
- ``reference/exit-codes.md``: ``pipelines.errors.EXIT_CODES`` and its exception classes.

Each ``*_page()`` function returns the page's Markdown; the docs tests call them directly.
"""

from __future__ import annotations

import argparse
import collections.abc
import datetime as dt
import inspect
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GENERATED = "<!-- Generated at build time by docs/hooks/reference.py from the code; do not edit. -->\n\n"


def _cell(text: object) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _rst(text: str) -> str:
    """A docstring's ``literal`` markup as Markdown code."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _first_paragraph(doc: str | None) -> str:
    doc = inspect.cleandoc(doc or "")
    return _rst(" ".join(doc.split("\n\n")[0].split())) if doc else ""


def _paragraphs(doc: str | None) -> str:
    doc = inspect.cleandoc(doc or "")
    return "\n\n".join(_rst(" ".join(p.split())) for p in doc.split("\n\n") if p.strip())


# --- output columns ---------------------------------------------------------------------------


def _arrow_type(t) -> str:
    import pyarrow as pa

    if pa.types.is_float32(t):
        return "float32"
    if pa.types.is_date32(t):
        return "date"
    if pa.types.is_list(t):
        return f"list<{_arrow_type(t.value_type)}>"
    if pa.types.is_map(t):
        return f"map<{_arrow_type(t.key_type)}, {_arrow_type(t.item_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {_arrow_type(f.type)}" for f in t) + ">"
    return str(t)


def columns_page() -> str:
    from operators import schema

    fields = list(schema.output_schema(include_image_bytes=True))
    lines = [
        "# Output columns",
        "",
        GENERATED,
        "Every run commits these columns, in this order, whatever stages it ran: a stage that is off "
        "leaves its columns null, so the table's schema never changes from one run to the next. "
        "Pass-through columns (`input.extra_columns`) come right after `source_shard`, with their input "
        "types; `image_bytes` is written only with `output.include_image_bytes`.",
        "",
        "| column | Arrow type | nullable | meaning |",
        "|---|---|---|---|",
    ]
    for field in fields:
        doc = schema.COLUMN_DOCS.get(field.name, "")
        lines.append(
            f"| `{field.name}` | `{_arrow_type(field.type)}` | {'yes' if field.nullable else 'no'} | {_cell(doc)} |"
        )
    lines += [
        "",
        "## Image statuses {#statuses}",
        "",
        "`status` says what became of the row's image. Every status but `ok` is also the row's "
        "`reject_reason`, and `error` says why (null exactly when `status` is `ok`).",
        "",
        "| `status` | reject reason |",
        "|---|---|",
    ]
    for status in schema.IMAGE_STATUSES:
        reason = "null (or a filter's reason)" if status == schema.IMAGE_STATUSES[0] else f"`{status}`"
        lines.append(f"| `{status}` | {reason} |")
    lines += [
        "",
        "## Reject reasons {#reject-reasons}",
        "",
        "A rejected row has `keep = false` and the first reason that applies, in this order: the image "
        "status, then the filter's checks, then deduplication, then the whole-run cut-off. The run record "
        "counts rows by reason, and `rows_in = rows_kept + rows_rejected` always holds.",
        "",
        "| # | `reject_reason` |",
        "|---:|---|",
    ]
    lines += [f"| {i} | `{reason}` |" for i, reason in enumerate(schema.REJECT_REASONS, 1)]
    return "\n".join(lines) + "\n"


# --- config keys ------------------------------------------------------------------------------


def _is_model(t) -> bool:
    from pydantic import BaseModel

    return isinstance(t, type) and issubclass(t, BaseModel)


def _args(t) -> tuple:
    return typing.get_args(t)


def _is_union(t) -> bool:
    return typing.get_origin(t) in (typing.Union, types.UnionType)


def _is_mapping(t) -> bool:
    return typing.get_origin(t) in (dict, collections.abc.Mapping, typing.Mapping)


def _type_name(t) -> str:
    from pydantic import SecretStr

    if t is type(None):
        return "null"
    if _is_union(t):
        return " or ".join(_type_name(a) for a in _args(t))
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in _args(t))
    if origin is tuple:
        args = _args(t)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} {_type_name(args[0])}"
    if _is_mapping(t):
        key, value = _args(t)
        return f"map of {_type_name(key)} → {_type_name(value)}"
    if _is_model(t):
        return "section"
    if t is SecretStr:
        return "secret string"
    if t is dt.date:
        return "date (YYYY-MM-DD)"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(t, getattr(t, "__name__", str(t)))


def _models_in(t) -> list:
    """The config models a field holds directly: ``X``, ``X | None``, ``Mapping[str, X]``."""
    if _is_model(t):
        return [t]
    if _is_union(t):
        return [m for a in _args(t) for m in _models_in(a)]
    if _is_mapping(t):
        return _models_in(_args(t)[1])
    return []


def _yaml(value) -> str:
    from pydantic import SecretStr

    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"`{value:,}`".replace(",", "_") if isinstance(value, int) and abs(value) >= 10_000 else f"`{value}`"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, SecretStr):
        return "`**********`"
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, collections.abc.Mapping):
        return "`{}`" if not value else "`{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}`"
    return f"`{value}`"


_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def _constraints(field) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS:
            bound = getattr(meta, attr, None)
            if bound is not None:
                out.append(f"{sign} {bound}")
        if getattr(meta, "min_length", None) is not None:
            out.append("not empty" if meta.min_length == 1 else f"length ≥ {meta.min_length}")
        if getattr(meta, "max_length", None) is not None:
            out.append(f"length ≤ {meta.max_length}")
    return ", ".join(out)


def config_rows(model=None, prefix: str = "", defaults=None) -> list[tuple[str, str, str, str, str]]:
    """(key path, type, default, constraints, description) of every config key, depth first.

    A nested key's default is what its parent's default holds (``clip.resources`` defaults to
    ``batch_size: 128``, not the 64 of a bare ``Resources``)."""
    from pydantic_core import PydanticUndefined

    from pipelines.config import PipelineConfig

    model = model or PipelineConfig
    rows = []
    for name, field in model.model_fields.items():
        path = prefix + name
        if defaults is not None:
            default = getattr(defaults, name)
            required = False
        else:
            required = field.is_required()
            default = (
                None
                if required
                else (
                    field.get_default(call_default_factory=True)
                    if field.default is not PydanticUndefined or field.default_factory
                    else None
                )
            )
        nested = _models_in(field.annotation)
        description = field.description or (_first_paragraph(nested[0].__doc__) if nested else "")
        shown = "required" if required else ("see below" if _is_model(type(default)) else _yaml(default))
        if prefix == "" and nested:
            description = ""  # a section's docstring opens its own part of the page
        rows.append((path, _type_name(field.annotation), shown, _constraints(field), description))
        for sub in nested:
            inner = default if isinstance(default, sub) else None
            sub_prefix = f"{path}.<name>." if _is_mapping(field.annotation) else f"{path}."
            rows += config_rows(sub, sub_prefix, inner)
    return rows


# Where the guide explains each section (a section missing here simply gets no link).
GUIDE = {
    "input": "../guide/inputs.md",
    "storage": "../guide/config.md#object-storage",
    "clip": "../guide/config.md",
    "decode": "../guide/config.md",
    "output": "../guide/output.md",
    "caption": "../guide/models.md#captioning",
    "itm": "../guide/models.md#itm",
    "ask": "../guide/models.md#asking-questions",
    "classifier": "../guide/models.md#image-classifier",
    "heads": "../guide/models.md#heads",
    "tags": "../guide/models.md#zero-shot-tags",
    "language": "../guide/models.md#caption-language",
    "filter": "../guide/config.md#filters",
    "dedup": "../guide/dedup.md",
    "report": "../guide/report.md",
}


def config_page() -> str:
    from pipelines.config import PipelineConfig

    rows = config_rows()
    sections = [name for name, f in PipelineConfig.model_fields.items() if _models_in(f.annotation)]
    top = [r for r in rows if "." not in r[0] and r[0] not in sections]
    lines = [
        "# Config keys",
        "",
        GENERATED,
        _paragraphs(PipelineConfig.__doc__) + " A run's config is a YAML file with these keys; every key "
        "below a section is written as its dotted path, which is also what `--set` takes "
        "(`--set filter.min_clip_score=0.25`). An unknown key fails before any work, naming its path. "
        "`<name>` stands for a name you choose (a tag, a classifier score). The [configuration guide]"
        "(../guide/config.md) explains what the keys do.",
        "",
        "Sections: " + ", ".join(f"[`{s}`](#{s})" for s in sections) + ", and the [top-level keys](#top-level).",
        "",
    ]

    def table(selected):
        out = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        out += [f"| `{p}` | {t} | {d} | {_cell(c)} | {_cell(x)} |" for p, t, d, c, x in selected]
        return out

    for section in sections:
        field = PipelineConfig.model_fields[section]
        model = _models_in(field.annotation)[0]
        required = field.is_required()
        optional = _is_union(field.annotation) and type(None) in _args(field.annotation)
        status = "required" if required else ("optional: the stage is off without it" if optional else "optional")
        guide = f" [Guide]({GUIDE[section]})." if section in GUIDE else ""
        lines += [
            f"## `{section}` {{#{section}}}",
            "",
            f"*{status.capitalize()}.* " + _paragraphs(model.__doc__) + guide,
            "",
        ]
        lines += table([r for r in rows if r[0] == section or r[0].startswith(section + ".")]) + [""]
    lines += ["## Top-level keys {#top-level}", ""] + table(top) + [""]
    return "\n".join(lines)


# --- CLI --------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser):
    """(sub-parser, help) of each verb, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield sub, helps.get(name, "")


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = parser.formatter_class(prog=parser.prog, width=96)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            value = f" {action.metavar or action.dest.upper()}" if action.nargs != 0 else ""
            name = ", ".join(f"`{o}{value}`" for o in action.option_strings)
        else:
            name = f"`{action.metavar or action.dest}`"
        notes = []
        if action.required and action.option_strings:
            notes.append("required")
        if action.choices:
            notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
        if isinstance(action, argparse._AppendAction):
            notes.append("repeatable")
        default = action.default
        if default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            notes.append(f"default `{default}`")
        help_text = (action.help or "") % {"default": default} if action.help else ""
        rows.append(f"| {name} | {_cell(help_text)} | {_cell('; '.join(notes))} |")
    return rows


def _command_section(parser: argparse.ArgumentParser, summary: str, level: int) -> list[str]:
    anchor = parser.prog.removeprefix("vlpipe ").replace(" ", "-")
    lines = [f"{'#' * level} `{parser.prog}` {{#{anchor}}}", ""]
    if summary:
        lines += [summary[0].upper() + summary[1:] + ".", ""]
    lines += ["```text", _usage(parser), "```", ""]
    rows = _argument_rows(parser)
    if rows:
        lines += ["| argument | meaning | notes |", "|---|---|---|", *rows, ""]
    for sub, text in _subcommands(parser):
        lines += _command_section(sub, text, level + 1)
    return lines


def cli_page() -> str:
    from jobs.cli import parser

    cli = parser()
    lines = [
        "# Command line",
        "",
        GENERATED,
        "Every command is a verb of `vlpipe`. The global options go before the verb "
        "(`vlpipe -v run ...`); `-h` after any verb prints its help. How a command ends is in "
        "[Exit codes](exit-codes.md).",
        "",
        "| verb | what it does |",
        "|---|---|",
    ]
    subs = list(_subcommands(cli))
    for sub, text in subs:
        verb = sub.prog.removeprefix("vlpipe ")
        lines.append(f"| [`{verb}`](#{verb}) | {_cell(text)} |")
    lines += [
        "",
        "## Global options {#global}",
        "",
        "```text",
        _usage(cli),
        "```",
        "",
        "| argument | meaning | notes |",
        "|---|---|---|",
        *_argument_rows(cli),
        "",
    ]
    for sub, text in subs:
        lines += _command_section(sub, text, 2)
    return "\n".join(lines)


# --- exit codes -------------------------------------------------------------------------------


def exit_code_table() -> list[tuple[int, str]]:
    """(code, meaning) from ``pipelines.errors.EXIT_CODES``."""
    from pipelines.errors import EXIT_CODES

    return sorted(EXIT_CODES.items())


def _error_classes() -> list[type]:
    from pipelines.errors import VlpipeError

    found, todo = [], [VlpipeError]
    while todo:
        cls = todo.pop(0)
        if cls.__module__ == "pipelines.errors" and cls not in found:
            found.append(cls)
        todo += cls.__subclasses__()
    return found


def exit_codes_page() -> str:
    from pipelines import errors

    classes = _error_classes()
    lines = [
        "# Exit codes",
        "",
        GENERATED,
        "Every `vlpipe` command ends with one of these codes. An expected failure prints one line, "
        "`vlpipe: <what> <where>: <cause>`, and no traceback (`-v` adds it). A run writes its run record "
        "whatever ends it, with a status that agrees with the code "
        "(see [Exit codes and run records](../guide/running.md#exit-codes-and-run-records)).",
        "",
        "| code | meaning | raised as |",
        "|---:|---|---|",
    ]
    for code, meaning in exit_code_table():
        raised = ", ".join(f"`{c.__name__}`" for c in classes if c.exit_code == code)
        lines.append(f"| {code} | {_cell(meaning)} | {raised} |")
    lines += [
        "",
        "## Error classes {#error-classes}",
        "",
        "Code that embeds vlpipe can catch these; each carries its `exit_code`.",
        "",
        "| class | exit code | when |",
        "|---|---:|---|",
    ]
    for cls in classes:
        lines.append(f"| `{cls.__name__}` | {cls.exit_code} | {_cell(_first_paragraph(cls.__doc__))} |")
    lines += [
        "",
        f"Exceptions that are not `{errors.VlpipeError.__name__}`s (a bug, a Ray failure) end "
        f"with code {errors.exit_code_for(RuntimeError())}; Ctrl-C ends with "
        f"{errors.exit_code_for(KeyboardInterrupt())}.",
        "",
    ]
    return "\n".join(lines)


PAGES = {
    "reference/columns.md": columns_page,
    "reference/config.md": config_page,
    "reference/cli.md": cli_page,
    "reference/exit-codes.md": exit_codes_page,
}


def on_files(files, config):
    """Add the generated pages to the build (MkDocs ``on_files`` event)."""
    from mkdocs.structure.files import File

    for path, render in PAGES.items():
        existing = files.get_file_from_path(path)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, path, content=render()))
    return files
