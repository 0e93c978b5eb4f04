"""One worker process (started by the supervisor, never by hand):

    python -m inhouse.workers.child CONTROL_SOCKET INDEX COUNT   (settings as JSON on stdin)

A whole server on the shared ports; it stops when asked (SIGTERM: drain, then exit) or when its
supervisor goes away."""

from __future__ import annotations

import asyncio
import signal
import sys

from inhouse.logs import configure_logging
from inhouse.settings import ServerSettings
from inhouse.workers.link import WorkerLink
from inhouse.workers.owner import ModelHost
from inhouse.workers.wire import owner_path


async def _serve(settings: ServerSettings, link: WorkerLink) -> None:
    from inhouse.server import InhouseServer  # the web stack and backends, after the cheap checks

    await link.connect()
    await link.tell("may_build")  # answered once the first worker has created the shared stores
    server = InhouseServer(settings, worker=link)
    # the models this worker holds for the others (placement: one) are reached here
    host = ModelHost(server.manager, lambda: server.state.started)
    await host.start(owner_path(link.folder, link.index))
    await link.tell("built")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    # the supervisor died: do not serve on without it
    link.channel.closed_callback = server.request_stop
    try:
        await server.start()
        await link.tell("ready")
        await server.wait_stopped()
    finally:
        await host.close()
        await server.stop()
        await link.close()


def main() -> int:
    path, index, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings = ServerSettings.model_validate_json(sys.stdin.buffer.read())
    configure_logging(settings.log_level, settings.log_format)
    from inhouse.server import StartupError

    coro = _serve(settings, WorkerLink(path, index, count))
    try:
        try:
            import uvloop

            uvloop.run(coro)
        except ImportError:
            asyncio.run(coro)
    except StartupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
