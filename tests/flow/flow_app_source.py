"""The app module that the flow-control process tests run in worker processes."""

SOURCE = """
    import json
    import os
    import time

    import anyio

    from omnidaemon import App, Budget, Context, RateLimit

    app = App("flow")
    LOG = os.environ["T_LOG"]
    RECLAIM_IDLE = float(os.environ.get("T_RECLAIM_IDLE", "2"))


    def note(**fields):
        # One O_APPEND write, then fsync: a SIGKILL loses nothing already recorded.
        fields.update(pid=os.getpid(), at=time.time())
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(fields) + "\\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)


    @app.agent("flow.paced", rate_limit=RateLimit(10, per=1, burst=2), reclaim_idle=RECLAIM_IDLE)
    async def paced(event: dict, ctx: Context) -> None:
        note(agent="paced", n=event["n"], phase="start")


    @app.agent(
        "flow.keyed", rate_limit="4/s", rate_limit_key=lambda e: e["k"], reclaim_idle=RECLAIM_IDLE
    )
    async def keyed(event: dict, ctx: Context) -> None:
        note(agent="keyed", k=event["k"], n=event["n"], phase="start")


    @app.agent(
        "flow.slots",
        key_concurrency=2,
        concurrency_key=lambda e: e["k"],
        reclaim_idle=RECLAIM_IDLE,
        concurrency=8,
    )
    async def slots(event: dict, ctx: Context) -> None:
        note(agent="slots", k=event["k"], n=event["n"], attempt=ctx.attempt, phase="start")
        # A "hang" event hangs its first attempt (its worker is SIGKILLed meanwhile).
        hang = event.get("hang") and ctx.attempt == 1
        await anyio.sleep(60.0 if hang else event.get("sleep", 0.02))
        note(agent="slots", k=event["k"], n=event["n"], attempt=ctx.attempt, phase="end")


    TOKENS = Budget("model.tokens", 100, per="second")


    @app.agent("flow.spend", budgets=[TOKENS], reclaim_idle=RECLAIM_IDLE)
    async def spend(event: dict, ctx: Context) -> None:
        note(agent="spend", n=event["n"], phase="start")
        await ctx.charge("model.tokens", event["used"])
        note(agent="spend", n=event["n"], phase="charged")
"""
