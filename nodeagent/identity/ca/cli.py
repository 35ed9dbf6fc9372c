"""`nodeagent ca`: run the mesh CA (a Deployment in a cluster, one process in the lab).

Settings are identity/ca/config.py's; `server.build` wires them into a CaServer (tests start
exactly what the command runs); this module serves it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from nodeagent.identity.ca import config


def register(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("ca", help="run the mesh CA (signs workload certificates for node agents)",
                        description="Serve istio.v1.auth.IstioCertificateService/CreateCertificate over "
                                    "TLS until SIGTERM/SIGINT. Every flag has a NODEAGENT_CA_* "
                                    "environment variable; the flag wins. Agents verify the CA with "
                                    "<state-dir>/root-cert.pem (files source) or the root-cert.pem "
                                    "of --root-configmap (kube source).")
    config.add_arguments(ca)
    ca.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from nodeagent.identity.ca import server as ca_server  # grpc and cryptography: only when needed

    cfg = config.load(args)
    log = logging.getLogger("nodeagent.ca")
    registry = CollectorRegistry()
    server = ca_server.build(cfg, registry, log)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    port = server.start()
    root = (f"ConfigMap {cfg.namespace}/{cfg.root_configmap} key root-cert.pem" if cfg.kube
            else f"{cfg.state_dir}/root-cert.pem")
    print(f"nodeagent ca: {cfg.trust_domain} CA listening on {cfg.listen[0]}:{port} "
          f"({cfg.server_identity_uri}, {', '.join(cfg.server_names)}); root {root}",
          file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0
