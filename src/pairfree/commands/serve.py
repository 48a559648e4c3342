"""``pairfree serve``: a web page that captions images with a checkpoint."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from pairfree.commands.common import add_device, at_least
from pairfree.errors import PairfreeError


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a web page to caption images with a checkpoint (gradio)",
        description=(
            "Serve CHECKPOINT (a checkpoint, a run folder or a Hub repo id) as a web page: "
            "upload an image, set the beams and the length, get its caption; a world "
            "checkpoint also gets a 'random world scene' button. Needs gradio "
            "(pip install 'pairfree[serve]'). Listens on 127.0.0.1 unless --host says else."
        ),
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint, run folder or Hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=at_least(1, at_most=65535), default=7860,
                   help="port (default 7860)")  # fmt: skip
    p.add_argument("--queue", type=at_least(1), default=8,
                   help="requests waiting for a caption; beyond them a request is refused at "
                   "once with HTTP 503 'Queue is full' (default 8)")  # fmt: skip
    p.add_argument("--max-upload-mb", type=at_least(1), default=20,
                   help="largest upload in MB; larger ones get HTTP 413 (default 20)")  # fmt: skip
    add_device(p)
    p.set_defaults(func=run)


def check_free(host: str, port: int) -> None:
    """Refuse, before loading anything, a port that is taken or an address that is not this
    machine's (gradio's own message for both is about its environment variables)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind((host, port))
    except OSError as err:
        raise PairfreeError(
            f"cannot serve on {host}:{port}: {err.strerror or err} (choose another --port or "
            "--host)"
        ) from None


def run(args: argparse.Namespace) -> int:
    from pairfree.demo import web
    from pairfree.pipeline import Captioner

    check_free(args.host, args.port)
    captioner = Captioner.from_pretrained(args.checkpoint, device=args.device)
    app = web.build_app(captioner, queue_size=args.queue)
    print(f"serving {captioner.source} on http://{args.host}:{args.port} (Ctrl-C stops)")
    web.launch(app, args.host, args.port, max_upload_mb=args.max_upload_mb)
    return 0
