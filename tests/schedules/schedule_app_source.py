"""The app module that the schedule process tests run in worker processes."""

SOURCE = """
    import json
    import os
    import time
    from datetime import datetime

    import anyio

    from omnidaemon import App, Context

    app = App(os.environ["T_APP"])
    LOG = os.environ["T_LOG"]
    TOPIC = os.environ["T_TOPIC"]
    INTERVAL = float(os.environ.get("T_INTERVAL", "1"))
    HOLD = float(os.environ.get("T_HOLD", "0"))

    # The outage test spawns a worker early and lets it come up at a chosen moment: starting
    # Python may take seconds on a loaded machine, which would make that moment a guess.
    time.sleep(max(0.0, float(os.environ.get("T_START_AT", "0")) - time.time()))


    def note(**fields):
        # One O_APPEND write, then fsync: a SIGKILL loses nothing already recorded.
        fields.update(pid=os.getpid(), at=time.time())
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(fields) + "\\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)


    def timed(name, catch_up):
        @app.every(INTERVAL, topic=f"{TOPIC}.{name}", name=name, catch_up=catch_up)
        async def fire(tick: datetime) -> dict:
            note(kind="fn", schedule=name, tick=tick.timestamp())
            await anyio.sleep(HOLD)  # the claim is held meanwhile: a SIGKILL lands inside it
            return {"tick": tick.timestamp()}

        @app.agent(f"{TOPIC}.{name}", name=f"record_{name}", reclaim_idle=2.0)
        async def record(event: dict, ctx: Context) -> None:
            note(kind="got", schedule=name, tick=event["tick"], id=ctx.event_id)


    for name in os.environ.get("T_SCHEDULES", "main").split(","):
        timed(name, catch_up=name.startswith("up"))
"""
