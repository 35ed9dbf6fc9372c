"""CA settings: flag over NODEAGENT_CA_* variable over default; bad values named; the
`nodeagent ca` command runs and stops on SIGTERM."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.cli import build_parser
from nodeagent.errors import ConfigError
from nodeagent.identity.ca import config

from identity_fixtures import pod_yaml, write_pods, write_tokens


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    write_pods(tmp_path / "cluster", pod_yaml("web-0", "node1", "web"))
    write_tokens(tmp_path / "tokens.yaml", {"node1": "t" * 32})
    return {"state_dir": str(tmp_path / "ca"), "tokens": str(tmp_path / "tokens.yaml"),
            "source": f"files:{tmp_path / 'cluster'}"}


def test_defaults(base, tmp_path):
    cfg = config.load(base, {})
    assert cfg.listen == ("0.0.0.0", 15012)
    assert cfg.trust_domain == "cluster.local" and cfg.namespace == "istio-system"
    assert cfg.cert_ttl == dt.timedelta(hours=24)
    assert cfg.state_dir == tmp_path / "ca" and cfg.source_dir == tmp_path / "cluster"
    assert cfg.server_names == ("nodeagent-ca.istio-system.svc",)
    assert cfg.server_identity_uri == "spiffe://cluster.local/ns/istio-system/sa/nodeagent-ca"
    assert cfg.metrics_address == ("127.0.0.1", 15014)


def test_every_setting_has_a_flag_and_a_ca_variable():
    assert {s.env for s in config.SETTINGS} == {"NODEAGENT_CA_" + s.name.upper() for s in config.SETTINGS}
    parser = build_parser()
    args = parser.parse_args(["ca", "--cert-ttl", "1h", "--namespace", "mesh"])
    assert (args.cert_ttl, args.namespace) == ("1h", "mesh")


def test_flag_beats_variable_beats_default(base):
    env = {"NODEAGENT_CA_CERT_TTL": "2h", "NODEAGENT_CA_TRUST_DOMAIN": "corp.example",
           "NODEAGENT_CA_NAMESPACE": "mesh", "NODEAGENT_CA_METRICS_ADDRESS": "off"}
    cfg = config.load({**base, "cert_ttl": "90m"}, env)
    assert cfg.cert_ttl == dt.timedelta(minutes=90) and cfg.trust_domain == "corp.example"
    assert cfg.server_names == ("nodeagent-ca.mesh.svc",) and cfg.metrics_address is None


@pytest.mark.parametrize("raw, seconds", [("24h", 86400), ("1h30m", 5400), ("2d", 172800), ("600", 600),
                                          ("45s5m", 345)])
def test_durations(raw, seconds):
    assert config.parse_duration(raw) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("setting, raw, says", [
    ("cert_ttl", "30s", "between 1m and 90d"),
    ("cert_ttl", "1 day", "expected a duration"),
    ("cert_ttl", "100d", "between 1m and 90d"),
    ("trust_domain", "Cluster.Local", "may hold only lowercase"),
    ("listen", "localhost:15012", "is not an IP address"),
    ("listen", "0.0.0.0", "expected HOST:PORT"),
    ("namespace", "Istio_System", "Kubernetes namespace name"),
    ("server_names", "ca.example,bad name", "'bad name' is not a DNS name"),
    ("tokens", "/nonexistent/tokens.yaml", "no such file"),
    ("source", "kube:/nonexistent/kubeconfig", "is not a file"),
    ("source", "http://api", "expected files:DIR"),
    ("agent_service_account", "nodeagent", "expected NAMESPACE/NAME"),
    ("root_secret", "Keys", "not a Kubernetes object name"),
    ("token_audience", "a b", "non-empty word"),
])
def test_bad_values_name_the_setting_and_value(base, setting, raw, says):
    with pytest.raises(ConfigError) as err:
        config.load({**base, setting: raw}, {})
    text = str(err.value)
    assert text.startswith(f"setting {setting} (--{setting.replace('_', '-')})") and repr(raw) in text
    assert says in text and f"NODEAGENT_CA_{setting.upper()}" in text


def test_a_bad_variable_is_named_as_the_variable(base):
    with pytest.raises(ConfigError, match=r"setting cert_ttl \(NODEAGENT_CA_CERT_TTL\): bad value 'soon'"):
        config.load(base, {"NODEAGENT_CA_CERT_TTL": "soon"})


def test_required_settings_say_how_to_give_them(base):
    del base["tokens"]
    with pytest.raises(ConfigError, match="setting tokens: is required .*--tokens or set NODEAGENT_CA_TOKENS"):
        config.load(base, {})


def test_the_ca_command_serves_and_stops_on_sigterm(base, tmp_path):
    env = {**os.environ, "NODEAGENT_CA_LISTEN": "127.0.0.1:0", "NODEAGENT_CA_METRICS_ADDRESS": "off"}
    args = [sys.executable, "-m", "nodeagent", "ca", "--state-dir", base["state_dir"], "--tokens", base["tokens"],
            "--source", base["source"]]
    # Port 0 is refused by the listen parser, so this run must fail naming the setting...
    bad = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "setting listen (NODEAGENT_CA_LISTEN)" in bad.stderr
    # ...and a free port serves until SIGTERM.
    env["NODEAGENT_CA_LISTEN"] = "127.0.0.1:" + str(_free_port())
    env["PYTHONFAULTHANDLER"] = "1"  # a stop that hangs says where: every thread's stack on SIGABRT
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "CA listening on 127.0.0.1:" in line and "root-cert.pem" in line, line
        assert (tmp_path / "ca" / "root-cert.pem").exists()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # once in a fresh-clone run (2026-12-07), not reproduced
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=30)
            raise AssertionError(f"the CA did not stop on SIGTERM within 30 s:\n{proc.stderr.read()[-6000:]}")
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
