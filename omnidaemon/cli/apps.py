"""`omnidaemon agents APP` and `omnidaemon graph APP`: what an app declares, read from its code
(no bus needed)."""

from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

from omnidaemon.cli._common import JsonOption, load_cli_app
from omnidaemon.cli._output import emit_json, fail, print_table

if TYPE_CHECKING:
    from omnidaemon.app import App

__all__ = ["agents", "graph"]

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
    """The agents of APP: topics, payload and return types, what each publishes, policies."""
    from omnidaemon.topology import describe_agent, type_name

    loaded = _load("agents", app)
    specs = list(loaded.agents.values())
    if json:
        emit_json([describe_agent(s) for s in specs])
        return
    print_table(
        ["AGENT", "TOPIC", "PAYLOAD", "RETURNS", "PUBLISHES", "RETRIES", "CONCURRENCY", "TIMEOUT"],
        [
            [
                s.name,
                s.topic,
                type_name(s.payload_type),
                type_name(s.return_type),
                s.publishes or "-",
                str(s.policy.max_retries),
                str(s.concurrency),
                "-" if s.timeout is None else f"{s.timeout:g}s",
            ]
            for s in specs
        ],
        title=f"app {loaded.name}: {len(specs)} agents",
        numeric=["RETRIES", "CONCURRENCY"],
        empty="the app declares no agents",
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
