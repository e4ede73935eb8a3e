"""MkDocs hooks of the ubsmoe documentation site (registered in ``mkdocs.yml``, ``hooks:``).

Two generated parts:

- the configuration reference: ``docs/configuration.md`` carries the marker
  :data:`CONFIG_MARKER`, which :func:`on_page_markdown` replaces by
  :func:`config_reference_markdown`, built from the config dataclasses and the
  "Attributes:" sections of their docstrings;
- the API reference: one page per module of :data:`API_MODULES` (``::: module``,
  rendered by mkdocstrings), added to the files and to the navigation.

Only :func:`config_sections` and :data:`API_MODULES` know ubsmoe's module layout; adapt
those two when modules move. ``tests/test_docs.py`` imports this file by path.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from typing import Any

CONFIG_MARKER = "<!-- ubsmoe:config-reference -->"
CONFIG_PAGE = "configuration.md"

# The API reference: (navigation group, modules), in reading order from the bottom layer
# up. The one place to edit when a module is added, moved or renamed.
API_MODULES: list[tuple[str, list[str]]] = [
    ("Foundation", ["ubsmoe.errors", "ubsmoe.io", "ubsmoe.budgets", "ubsmoe.config", "ubsmoe.config.pretrain"]),
    ("Core math", ["ubsmoe.core.smoe", "ubsmoe.core.grouped", "ubsmoe.core.routing",
                   "ubsmoe.core.pseudo_grad", "ubsmoe.core.pg_apply", "ubsmoe.core.pg_fixed",
                   "ubsmoe.core.lora", "ubsmoe.core.privacy", "ubsmoe.core.accountant"]),
    ("Models", ["ubsmoe.models.build", "ubsmoe.models.presets", "ubsmoe.models.architecture",
                "ubsmoe.models.tokenizer", "ubsmoe.models.devices", "ubsmoe.models.patching",
                "ubsmoe.models.runtime", "ubsmoe.models.adapters", "ubsmoe.models.families",
                "ubsmoe.models.pretrain", "ubsmoe.models.pretrain_card", "ubsmoe.models.precision",
                "ubsmoe.models.compiled", "ubsmoe.models.fused",
                "ubsmoe.models.fused_host"]),
    ("Methods", ["ubsmoe.methods.base", "ubsmoe.methods.registry", "ubsmoe.methods.aggregation",
                 "ubsmoe.methods.ubsmoe", "ubsmoe.methods.fedit", "ubsmoe.methods.naive_smoe",
                 "ubsmoe.methods.smoe_llb", "ubsmoe.methods.a3smoe", "ubsmoe.methods.a3smoe_flexlora",
                 "ubsmoe.methods.rank_base", "ubsmoe.methods.hetlora", "ubsmoe.methods.flexlora",
                 "ubsmoe.methods.flora", "ubsmoe.methods.florist", "ubsmoe.methods.robust"]),
    ("Data, evaluation, metrics", ["ubsmoe.data.prompts", "ubsmoe.data.commonsense",
                                   "ubsmoe.data.pretrain_corpus",
                                   "ubsmoe.data.instruction", "ubsmoe.data.partition",
                                   "ubsmoe.eval.commonsense", "ubsmoe.eval.loglik",
                                   "ubsmoe.eval.context", "ubsmoe.eval.instruction", "ubsmoe.eval.loss",
                                   "ubsmoe.eval.utilization", "ubsmoe.metrics.model_shape",
                                   "ubsmoe.metrics.flops", "ubsmoe.metrics.plan",
                                   "ubsmoe.metrics.diagnostics", "ubsmoe.tracking"]),
    ("Federated learning", ["ubsmoe.fl.train", "ubsmoe.fl.client_runtime", "ubsmoe.fl.server", "ubsmoe.fl.state",
                            "ubsmoe.fl.round", "ubsmoe.fl.privacy", "ubsmoe.fl.round_diagnostics",
                            "ubsmoe.fl.evaluation", "ubsmoe.fl.checkpoints",
                            "ubsmoe.fl.declarations", "ubsmoe.fl.fold", "ubsmoe.fl.payload",
                            "ubsmoe.fl.validate", "ubsmoe.fl.messages", "ubsmoe.fl.run_dir",
                            "ubsmoe.fl.export", "ubsmoe.fl.model_card", "ubsmoe.fl.simulation",
                            "ubsmoe.fl.autobudget", "ubsmoe.fl.fleet_server", "ubsmoe.certs"]),
    ("Experiments, reports, runs", ["ubsmoe.experiments.grid", "ubsmoe.experiments.cells",
                                    "ubsmoe.experiments.sweep", "ubsmoe.report.build",
                                    "ubsmoe.report.tables", "ubsmoe.report.figures",
                                    "ubsmoe.report.runs", "ubsmoe.report.fleet", "ubsmoe.finished_run",
                                    "ubsmoe.bench.harness", "ubsmoe.bench.base", "ubsmoe.provenance"]),
]


def config_sections() -> list[tuple[str, type, str]]:
    """Every config section the reference documents, as ``(prefix, dataclass, title)``.

    The general sections are :class:`ubsmoe.config.RunConfig` itself (prefix ``""``);
    nested dataclass fields are walked by :func:`_field_rows`. Each registered method's
    config class follows under the method's name (``a3smoe.gamma``); methods without
    fields are listed by :func:`config_reference_markdown` instead.

    Returns:
        ``[(prefix, dataclass, title)]``; ``prefix`` ends in ``.`` unless empty.
    """
    from ubsmoe.config import RunConfig
    from ubsmoe.methods import available_methods, get_method_class

    sections = [("", RunConfig, "General sections")]
    for name in available_methods():
        cls = get_method_class(name).config_class
        sections.append((f"{name}.", cls, f"Method `{name}`"))
    return sections


def _embedded_defaults() -> dict[str, Any]:
    """The embedded default run (``ubsmoe/configs/default.yaml``) as dotted keys."""
    from ubsmoe.config import default_config_dict, flatten

    return flatten(default_config_dict())


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> description from the "Attributes:" docstring sections of ``cls`` and its bases.

    A subclass's entry wins over a base class's. Descriptions are joined into one line.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_parse_attributes(inspect.cleandoc(klass.__dict__.get("__doc__") or "")))
    return docs


def _parse_attributes(doc: str) -> dict[str, str]:
    """Parse one Google-style ``Attributes:`` section: ``name: text`` plus indented lines."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return out
    base = len(lines[start]) - len(lines[start].lstrip())
    entry_indent = None
    current = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base:
            break
        if entry_indent is None:
            entry_indent = indent
        m = re.match(r"(\w+)(?:\s*\([^)]*\))?:\s*(.*)", line.strip())
        if indent == entry_indent and m:
            current = m.group(1)
            out[current] = m.group(2)
        elif current is not None:
            out[current] += " " + line.strip()
    return out


def _markdown_text(text: str) -> str:
    """RST-flavoured docstring text as one Markdown table cell."""
    text = re.sub(r":(?:class|func|meth|attr|mod|data):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    # A table cell ends at a pipe outside a code span; escape those.
    parts = text.split("`")
    parts = [p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts)]
    return "`".join(parts)


def _type_name(tp: Any) -> str:
    """``int``, ``list[float]``, ``dict[str, str]``, ... for a field annotation."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _value(value: Any) -> str:
    """A default as it would be written in YAML, in a code span."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value)
    elif value == "":
        text = '""'
    else:
        text = str(value)
    return f"`{text}`"


def _field_rows(cls: type, prefix: str, embedded: dict[str, Any],
                missing: list[str]) -> list[tuple[str, list[str]]]:
    """Tables of ``cls``'s fields: ``[(section prefix, rows)]``, nested dataclasses after.

    A field without a description in any "Attributes:" section is appended to ``missing``
    (``key (module.Class)``).
    """
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    rows: list[str] = []
    nested: list[tuple[str, list[str]]] = []
    for f in dataclasses.fields(cls):
        if f.name == "method_config":  # the method's own section, documented per method
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.extend(_field_rows(tp, f"{key}.", embedded, missing))
            continue
        if not docs.get(f.name, "").strip():
            missing.append(f"{key} ({cls.__module__}.{cls.__qualname__})")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        run = embedded.get(key, default)
        run_cell = _value(run) if run != default else ""
        rows.append(f'| <span id="{key}"></span>`{key}` | `{_type_name(tp)}` | {_value(default)} '
                    f"| {run_cell} | {_markdown_text(docs.get(f.name, ''))} |")
    return [(prefix, rows)] + nested


def config_reference_markdown() -> str:
    """The configuration reference as Markdown: one table per config section.

    Walks :func:`config_sections`; every dataclass field (nested ones by their dotted
    key) becomes one row with its type, dataclass default, embedded-run value (when it
    differs) and the description from its class's "Attributes:" docstring section.

    Raises:
        ValueError: fields without a description, all named (dotted key and class).
    """
    from ubsmoe.methods import available_methods

    embedded = _embedded_defaults()
    missing: list[str] = []
    header = ["| key | type | default | embedded run | meaning |", "|---|---|---|---|---|"]
    out: list[str] = []
    without: list[str] = []
    for prefix, cls, title in config_sections():
        tables = [(p, rows) for p, rows in _field_rows(cls, prefix, embedded, missing) if rows]
        if not tables:
            without.append(f"`{prefix.rstrip('.')}`")
            continue
        out.append(f"## {title}\n")
        for sub, rows in tables:
            if sub != prefix or not prefix:  # a method's own fields sit under its title
                out.append(f"### `{sub.rstrip('.') or 'method'}`\n")
            out += [*header, *rows, ""]
    if missing:
        raise ValueError("config fields without a description in their class's 'Attributes:' "
                         "docstring section: " + ", ".join(missing))
    if without:
        out.append(f"Methods without a config section of their own: {', '.join(without)}.\n")
    out.append(f"Registered methods (`method=`): {', '.join(f'`{m}`' for m in available_methods())}.\n")
    return "\n".join(out)


# ---- MkDocs hooks -------------------------------------------------------------------------


def _api_path(module: str) -> str:
    return f"api/{module}.md"


def on_config(config):
    """Append the API reference (:data:`API_MODULES`) to the navigation."""
    nav = config.get("nav")
    if nav is not None:
        nav.append({"API reference": [{group: [{m: _api_path(m)} for m in modules]}
                                      for group, modules in API_MODULES]})
    return config


def on_files(files, config):
    """Add one generated page per API module: its title and ``::: module``."""
    from mkdocs.structure.files import File

    for _, modules in API_MODULES:
        for module in modules:
            files.append(File.generated(config, _api_path(module),
                                        content=f"# `{module}`\n\n::: {module}\n"))
    return files


_RST_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):<code>~?")


def on_page_content(html, page, config, files):
    """Drop Sphinx roles (``:func:`x` ``) that the docstrings use but Markdown does not know."""
    return _RST_ROLE.sub("<code>", html)


def on_page_markdown(markdown, page, config, files):
    """Replace :data:`CONFIG_MARKER` on the configuration page by the generated reference."""
    if page.file.src_uri == CONFIG_PAGE:
        if CONFIG_MARKER not in markdown:
            raise ValueError(f"{CONFIG_PAGE}: the marker {CONFIG_MARKER} is missing")
        markdown = markdown.replace(CONFIG_MARKER, config_reference_markdown())
    return markdown
