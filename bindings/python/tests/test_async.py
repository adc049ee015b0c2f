"""forward() from asyncio: ``async with``, awaiting it, and tunnels on demand from an
async Starlette handler that redirects to the new URL."""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

import httpx
from clients import answers, https_get
from conftest import EchoServer, Relay, address_of, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

import portferry


def test_async_with_opens_and_closes(relay_env: Relay, echo_server: Callable[[int], EchoServer]) -> None:
    port = free_port()
    echo_server(port)

    async def main() -> str:
        async with portferry.forward(port) as tunnel:
            assert await asyncio.to_thread(answers, tunnel.url, relay_env.ca)
            return tunnel.url

    url = asyncio.run(main())
    assert not answers(url, relay_env.ca)


def test_the_event_loop_runs_while_forward_waits(relay: Relay, silent_relay: socket.socket) -> None:
    agent = portferry.Agent(address_of(silent_relay), relay.token, connect_timeout=60)

    async def main() -> tuple[bool, bool]:
        opening = asyncio.ensure_future(agent.forward(8000).__aenter__())
        # The agent connects while the loop goes on: forward() waits for an answer.
        connection, _ = await asyncio.to_thread(silent_relay.accept)
        with connection:
            still_waiting = not opening.done()
            opening.cancel()
            try:
                await opening
            except asyncio.CancelledError:
                return still_waiting, True
            return still_waiting, False

    assert asyncio.run(main()) == (True, True)


def test_tunnels_on_demand_from_an_async_handler(relay_env: Relay) -> None:
    """The documents' hub: a POST starts a service for its user, forwards it, and
    redirects the user to the new URL."""
    tunnels: dict[str, portferry.Tunnel] = {}
    services: list[asyncio.Server] = []

    async def serve_user(user: str) -> int:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            body = f"notebook of {user}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        services.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def hub(request: Request) -> Response:
        user = request.path_params["user"]
        if request.headers.get("authorization") != "Bearer secret":
            return Response("not authenticated", status_code=401)
        if user not in tunnels:
            tunnels[user] = await portferry.forward(await serve_user(user))
        return RedirectResponse(tunnels[user].url, status_code=303)

    app = Starlette(routes=[Route("/hub/{user}", hub, methods=["POST"])])

    async def main() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
            refused = await client.post("/hub/ann")
            assert refused.status_code == 401
            bodies = []
            for user in ["ann", "bob", "ann"]:
                response = await client.post(f"/hub/{user}", headers={"authorization": "Bearer secret"})
                assert response.status_code == 303
                location = response.headers["location"]
                status, _, body = await asyncio.to_thread(https_get, location, relay_env.ca)
                assert status == 200
                bodies.append(body.decode())
            return bodies

    try:
        assert asyncio.run(main()) == ["notebook of ann", "notebook of bob", "notebook of ann"]
        assert len(tunnels) == 2
    finally:
        for tunnel in tunnels.values():
            tunnel.close()
        for server in services:
            server.close()
