"""``pairfree serve``: a web page that captions images with a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.commands.common import add_device


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
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pairfree.demo.web import build_app
    from pairfree.pipeline import Captioner

    captioner = Captioner.from_pretrained(args.checkpoint, device=args.device)
    app = build_app(captioner)
    print(f"serving {captioner.source} on http://{args.host}:{args.port} (Ctrl-C stops)")
    app.launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0
