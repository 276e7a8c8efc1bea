"""`omnidaemon agents APP`, `omnidaemon graph APP` and `omnidaemon asyncapi APP`: what an app
declares, read from its code (no bus needed)."""

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from omnidaemon.cli._common import JsonOption, load_cli_app
from omnidaemon.cli._output import emit_json, fail, plural, print_table

if TYPE_CHECKING:
    from omnidaemon.app import App

__all__ = ["agents", "asyncapi", "graph"]

AppArgument = Annotated[
    str,
    typer.Argument(
        metavar="APP",
        help="'module:attribute', a module holding one App, or a file ('./myapp.py[:app]').",
    ),
]


def _load(command: str, target: str) -> "App":
    from omnidaemon.errors import OmniDaemonError

    try:
        return load_cli_app(target)
    except OmniDaemonError as exc:
        raise typer.Exit(fail(command, str(exc), 2)) from None


def agents(app: AppArgument, json: JsonOption = False) -> None:
    """The agents of APP: topics, payload and return types (and debouncing), what each
    publishes, policies; then its schedules."""
    from omnidaemon.topology import describe_agent, type_name

    loaded = _load("agents", app)
    specs = list(loaded.agents.values())
    timed = list(loaded.schedules.values())
    if json:
        # Each agent with the schedules that publish to its topic (`schedules --json` lists
        # the schedules themselves).
        emit_json(
            [
                {**describe_agent(s), "scheduled_by": [t.name for t in timed if t.topic == s.topic]}
                for s in specs
            ]
        )
        return
    print_table(
        ["AGENT", "TOPIC", "PAYLOAD", "RETURNS", "PUBLISHES", "RETRIES", "CONCURRENCY", "TIMEOUT"],
        [
            [
                s.name,
                s.topic,
                type_name(s.payload_type)
                if s.debounce is None
                else f"{type_name(s.payload_type)}, debounced {s.debounce.seconds:g}s "
                f"(max {s.debounce.max_wait:g}s)",
                type_name(s.return_type),
                s.publishes or "-",
                str(s.policy.max_retries),
                str(s.concurrency),
                "-" if s.timeout is None else f"{s.timeout:g}s",
            ]
            for s in specs
        ],
        title=f"app {loaded.name}: {plural(len(specs), 'agent')}",
        numeric=["RETRIES", "CONCURRENCY"],
        empty="the app declares no agents",
    )
    if timed:
        print_table(
            ["SCHEDULE", "WHEN", "TIME ZONE", "PUBLISHES", "CATCH UP"],
            [[t.name, t.spec, t.timezone, t.topic, "yes" if t.catch_up else "no"] for t in timed],
            title=f"{plural(len(timed), 'schedule')} (omnidaemon schedules APP: fire times)",
        )


class GraphFormat(StrEnum):
    """Formats `graph` can print."""

    mermaid = "mermaid"
    dot = "dot"


def graph(
    app: AppArgument,
    format: Annotated[
        GraphFormat, typer.Option("--format", help="mermaid (for Markdown) or dot (Graphviz).")
    ] = GraphFormat.mermaid,
) -> None:
    """The event flow of APP: topics, the agents that consume them and what they publish."""
    topology = _load("graph", app).topology()
    print(topology.to_mermaid() if format is GraphFormat.mermaid else topology.to_dot())


class DocumentFormat(StrEnum):
    """Formats `asyncapi` can print."""

    json = "json"
    yaml = "yaml"


def asyncapi(
    app: AppArgument,
    format: Annotated[
        DocumentFormat, typer.Option("--format", help="json, or yaml (needs PyYAML).")
    ] = DocumentFormat.json,
    version: Annotated[
        str, typer.Option("--api-version", metavar="V", help="The document's info.version.")
    ] = "1.0.0",
) -> None:
    """The AsyncAPI 3.0 document of APP: topics as channels, agents as operations, payload
    schemas from the agents' types."""
    from omnidaemon.asyncapi import asyncapi_document

    document = asyncapi_document(_load("asyncapi", app), version=version)
    if format is DocumentFormat.json:
        emit_json(document)
        return
    import importlib

    try:
        # Optional, and untyped: imported by name so that type checking does not need it.
        yaml = importlib.import_module("yaml")
    except ImportError:
        raise typer.Exit(
            fail("asyncapi", "YAML output needs PyYAML: pip install pyyaml (or use JSON)", 2)
        ) from None
    print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")
