"""``difffeat demo`` as one library call: everything that can stop the demo is checked before it starts
(gradio installed, the port free, the model loadable), then :func:`difffeat.demo.launch` serves it."""

from __future__ import annotations

import importlib.util
import socket

from .checks import check_number
from .errors import DifffeatError, InvalidOptionError

__all__ = ["serve", "check_port"]


def check_port(host: str, port: int) -> None:
    """Raise if nothing can listen on ``host:port`` (in use, or not an address of this machine)."""
    check_number("--port", port, 1, 65535, integer=True)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise InvalidOptionError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); the port is in use or "
                                     "the address is not this machine's: pass another --port or --host") from None


def serve(model: str = "shapes", port: int = 7860, host: str = "127.0.0.1", concurrency: int = 1,
          model_config: str | None = None) -> None:
    """Check, then serve the Gradio demo of ``model`` until interrupted; ``model_config`` is the config (hub id
    or diffusers folder) of a single-file ``model``."""
    if importlib.util.find_spec("gradio") is None:
        raise DifffeatError("the demo needs gradio, which is not installed: pip install 'difffeat[demo]'")
    check_number("--concurrency", concurrency, 1, 64, integer=True)
    check_port(host, port)
    from .backbones.loading import check_model
    from .backbones.single_file import is_single_file

    check_model(model)  # a single file's config is checked, from the headers, when the demo loads it
    if model_config is not None and not is_single_file(model):
        raise InvalidOptionError(f"--model-config is only for a single-file checkpoint, and {model!r} is not one: "
                                 "drop --model-config, or pass the .safetensors / .ckpt file as --model")
    from .demo import launch

    launch(model, port=port, host=host, concurrency=concurrency, model_config=model_config)
