"""`dpllama serve --replicas N`: N engines as Ray Serve replicas behind Ray's HTTP proxy, each the same app
(dpllama.serve.app) over its own engine and model, built in the replica's process; Ray's proxy spreads the
requests over them. Every replica loads the model onto the device it selects: give each its own device
(DPLLAMA_DEVICE on each node of a Ray cluster) for the replicas to add up."""
from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Callable

from dpllama.errors import DpllamaError
from dpllama.llm import LLM
from dpllama.serve import log


def serve_replicas(load: Callable[[int], LLM], host: str, port: int, replicas: int, slots: int, max_waiting: int,
                   model_name: str, api_keys: frozenset[str], drain_timeout: float, template_kwargs: dict,
                   reasoning_format: str) -> int:
    """Run until SIGTERM or SIGINT, then let Ray Serve drain the replicas (`drain_timeout` seconds each).
    `load(slots)` is called in each replica."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise DpllamaError("--replicas needs Ray Serve: pip install 'dpllama[ray]'") from None
    from dpllama.serve.app import announce, make_app
    from dpllama.serve.engine import Engine
    from dpllama.serve.metrics import Metrics

    class Replica:
        def __serve_build_asgi_app__(self):
            def fatal(message: str) -> None:
                log(f"dpllama: error: {message}")
                os._exit(1)     # the replica dies, and Ray Serve says so and starts another
            engine = Engine(load, slots, max_waiting, Metrics(), fatal, announce(model_name))
            return make_app(engine, model_name, api_keys, template_kwargs, reasoning_format,
                            replica=f"{socket.gethostname()}:{os.getpid()}")

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(serve.ingress()(Replica), name="dpllama", num_replicas=replicas,
                                  max_ongoing_requests=slots + max_waiting, graceful_shutdown_timeout_s=drain_timeout)
    serve.run(deployment.bind(), name="dpllama", route_prefix="/")
    log(f"dpllama: listening on http://{host}:{port} ({replicas} Ray Serve replicas of {model_name})")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    while not stop.wait(0.5):     # a timed wait, so that the signal handlers run
        pass
    serve.shutdown()    # Ray Serve drains each replica: its requests finish, then its app's lifespan ends
    ray.shutdown()
    return 0
