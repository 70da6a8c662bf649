"""``r2 serve --checkpoint C [--host 127.0.0.1] [--port 8000]``: the grounding page on a local port."""

from __future__ import annotations

import ipaddress
import math
import socket
from pathlib import Path

import typer

from shards.cliutil import user_errors
from shards.errors import ConfigError

LOCAL_NAMES = ["127.0.0.1", "localhost"]
"""``Host`` names answered when bound to the IPv4 loopback (others get 400: DNS rebinding)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost``, ``127.x.x.x``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0: a free one).

    Raises:
        ConfigError: the address cannot be bound (in use, not this machine's, no permission).
    """
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: not an address of this machine ({err.strerror})") from err
    sock = socket.socket(info[0], info[1], info[2])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host} port {port} ({err.strerror}): choose another with --port"
        ) from err
    sock.set_inheritable(True)
    return sock


def serve(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="best.pt / last.pt written by r2 train."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on; anything but a loopback address lets other machines in."
    ),
    port: int = typer.Option(8000, help="Port to listen on (0: a free one)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    max_upload_mb: float = typer.Option(500, help="Largest video upload, in MB."),
    max_minutes: float = typer.Option(60, help="Longest video, in minutes."),
    cache_mb: float = typer.Option(
        2000, help="Most MB of encoded videos kept in memory (least recently used dropped first)."
    ),
    idle_minutes: float = typer.Option(
        30, help="Minutes after which an unused uploaded video is forgotten and its file removed."
    ),
    weights: str | None = typer.Option(
        None, help="CLIP weights file if the one recorded in the checkpoint moved (checksum must match)."
    ),
    fps: float | None = typer.Option(
        None, help="Clips per second, for checkpoints trained at per-video rates (as in r2 predict)."
    ),
    precision: str | None = typer.Option(
        None, help="What the CLIP towers compute in: fp32 | fp16; default: the checkpoint's store's."
    ),
) -> None:
    """Serve a web page to ground sentences in a video (an upload or an embedded sample)."""
    with user_errors():
        limits = {
            "--max-upload-mb": max_upload_mb, "--max-minutes": max_minutes,
            "--cache-mb": cache_mb, "--idle-minutes": idle_minutes,
        }
        for flag, value in limits.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a number above 0, got {value:g}")
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {port}")
        sock = bind(host, port)
        import uvicorn

        from r2.predict import Predictor
        from r2.serve.app import create_app

        predictor = Predictor.from_checkpoint(
            checkpoint, device=device, weights=weights, fps=fps, precision=precision
        )
        app = create_app(
            predictor,
            model=checkpoint.name,
            max_upload_bytes=int(max_upload_mb * 1e6),
            max_seconds=max_minutes * 60,
            cache_bytes=int(cache_mb * 1e6),
            idle_s=idle_minutes * 60,
            allowed_hosts=LOCAL_NAMES if host in LOCAL_NAMES else None,
        )
    if not is_loopback(host):
        typer.echo(
            f"warning: listening on {host}: other machines can reach this page, and anyone who can may "
            "upload videos and run the model (there is no login); use --host 127.0.0.1 to keep it local",
            err=True,
        )
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    device_name = predictor.backbone.device
    typer.echo(f"r2 serve: {checkpoint} on {device_name}; open http://{shown}:{bound}/ (Ctrl-C stops)")
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
