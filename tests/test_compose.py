"""deploy/compose/docker-compose.yaml is coherent (there is no Docker engine here, so this is what can be
checked): services, dependencies, the one repo image, real `mizzen` subcommands and flags, environment
variables the services read, ports as settings.py has them, demo pods that match the demo mesh, sidecar
bootstraps that Envoy accepts, and a demo app (the package's services/demo/echo.py) that forwards the request
id."""

from __future__ import annotations

import ast
import contextlib
import ipaddress
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from mizzen.services.cli import bootstrap as bootstrap_cli
from mizzen.services.cli.main import COMMANDS
from mizzen.services.mesh import procs, settings, yamlio
from mizzen.services.mesh.validation import check_documents

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
DEMO_APP_ARGV = ["python", "-m", "mizzen.services.demo.echo"]  # the package's demo app, installed in the image
DEMO_MESH = COMPOSE_DIR / "demo" / "mesh.yaml"

# Variables read by programs other than Mizzen's services (Python itself).
FOREIGN_ENV = {"PYTHONUNBUFFERED"}


# ---------------------------------------------------------------------------------------------------------
# helpers


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def is_mizzen_image(svc: dict) -> bool:
    return "build" in svc


def mizzen_services() -> dict[str, dict]:
    return {name: svc for name, svc in services().items() if is_mizzen_image(svc)}


def mizzen_commands() -> dict[str, list[str]]:
    return {name: svc["command"] for name, svc in mizzen_services().items() if svc["command"][0] == "mizzen"}


SIDECAR_COMMANDS = (["mizzen", "bootstrap"], ["mizzen", "agent"])


def sidecars() -> dict[str, dict]:
    return {name: svc for name, svc in mizzen_services().items() if svc["command"][:2] in SIDECAR_COMMANDS}


def script_commands(svc: dict) -> list[list[str]]:
    """The `mizzen …` commands of a `sh -c` one-shot (split at &&, up to a redirection)."""
    cmd = svc["command"]
    assert cmd[:2] == ["sh", "-c"], cmd
    out = []
    for part in cmd[2].split("&&"):
        words = shlex.split(part.split(">")[0])
        if words and words[0] == "mizzen":
            out.append(words)
    return out


def depends_on(svc: dict) -> list[str]:
    deps = svc.get("depends_on") or []
    return list(deps) if isinstance(deps, (list, dict)) else []


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def flag_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def environment(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def healthcheck_url(svc: dict) -> str | None:
    test = (svc.get("healthcheck") or {}).get("test") or []
    for part in test:
        m = re.search(r"https?://[^'\"\s]+", str(part))
        if m:
            return m.group(0)
    return None


def env_names_read_by_services() -> set[str]:
    """Every environment variable name the code under services/ reads literally (env(...), settings.env(...),
    os.environ.get/[...], os.getenv(...))."""
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            arg = None
            if isinstance(node, ast.Call) and node.args:
                func = node.func
                fname = (
                    func.attr
                    if isinstance(func, ast.Attribute)
                    else func.id
                    if isinstance(func, ast.Name)
                    else ""
                )
                if fname in {"env", "getenv"} or (
                    fname == "get"
                    and isinstance(func, ast.Attribute)
                    and ast.unparse(func.value).endswith("environ")
                ):
                    arg = node.args[0]
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
                arg = node.slice
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(arg.value)
    return names


def demo_objects() -> list[dict]:
    objects, errors = check_documents(yamlio.load_paths([str(DEMO_MESH)]))
    assert not errors, errors
    return objects


def by_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in demo_objects() if o["kind"] == kind}


# ---------------------------------------------------------------------------------------------------------
# structure


def test_every_service_has_an_image_or_build_and_a_command_or_image_default():
    svcs = services()
    assert svcs
    for name, svc in svcs.items():
        assert "image" in svc or "build" in svc, name
        if is_mizzen_image(svc):
            assert isinstance(svc.get("command"), list) and svc["command"], (
                f"{name}: mizzen services spell out the command"
            )


def test_the_stack_has_the_required_parts():
    svcs = services()
    for required in ("nats", "redis", "jaeger", "registry", "translator", "xds-gateway", "logsink"):
        assert required in svcs, required
    assert "-js" in svcs["nats"]["command"]  # JetStream (the logsink's durable consumer)
    assert environment(svcs["jaeger"])["COLLECTOR_OTLP_ENABLED"] == "true"
    assert len(sidecars()) >= 2


def test_references_point_at_things_that_exist():
    doc = compose()
    svcs = doc["services"]
    volumes = set(doc.get("volumes") or {})
    networks = set(doc.get("networks") or {}) | {"default"}
    for name, svc in svcs.items():
        for dep in depends_on(svc):
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            assert dep != name
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.split(":", 1)[1] in svcs, f"{name}: network_mode {mode}"
            assert mode.split(":", 1)[1] in depends_on(svc) or any(
                mode.split(":", 1)[1] in depends_on(svcs[d]) for d in depends_on(svc)
            ), f"{name} must start after its network owner"
        for net in svc.get("networks") or {}:
            assert net in networks, f"{name}: network {net}"
        for mount in svc.get("volumes") or []:
            source = mount.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).resolve().exists(), f"{name}: bind mount {source}"
            else:
                assert source in volumes, f"{name}: volume {source}"


def test_dependency_graph_has_no_cycles():
    svcs = services()
    state: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert state.get(name) != 1, f"cycle: {' -> '.join((*path, name))}"
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in depends_on(svcs[name]):
            visit(dep, (*path, name))
        state[name] = 2

    for name in svcs:
        visit(name, ())


def test_one_image_built_from_the_repo_root():
    builds = {json.dumps(svc["build"], sort_keys=True) for svc in mizzen_services().values()}
    assert len(builds) == 1
    build = next(iter(mizzen_services().values()))["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == ROOT
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text)
    # Everything the image copies exists and is not excluded by .dockerignore.
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for copied in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for item in copied.split():
            assert (ROOT / item).exists(), item
            assert item not in ignored, item
    assert {svc["image"] for svc in mizzen_services().values()} == {"mizzen:dev"}


# ---------------------------------------------------------------------------------------------------------
# commands, flags, environment


def test_commands_are_real_mizzen_subcommands_or_the_demo_app():
    for name, svc in mizzen_services().items():
        cmd = svc["command"]
        if cmd[0] == "mizzen":
            assert cmd[1] in COMMANDS, f"{name}: mizzen {cmd[1]} is not a command"
        elif cmd[0] == "sh":  # a one-shot script of mizzen commands (ca-init)
            scripted = script_commands(svc)
            assert scripted, f"{name}: a script with no mizzen command"
            for words in scripted:
                assert words[1] in COMMANDS, f"{name}: mizzen {words[1]} is not a command"
                help_argv = words[1:3] if words[1] == "ca" else words[1:2]
                result = subprocess.run([sys.executable, "-m", "mizzen.services.cli.main", *help_argv, "--help"],
                                        capture_output=True, text=True, timeout=60, cwd=ROOT)
                assert result.returncode == 0, f"{name}: {result.stderr}"
                for flag in (a for a in words[2:] if re.fullmatch(r"--?[A-Za-z][\w-]*", a)):
                    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), f"{name}: {flag}"
        else:
            assert cmd[:3] == DEMO_APP_ARGV, f"{name}: {cmd}"
            result = subprocess.run([sys.executable, *cmd[1:4], "--help"], capture_output=True, text=True,
                                    timeout=60, cwd=ROOT)
            assert result.returncode == 0, f"{name}: {result.stderr}"
            for flag in (a for a in cmd[4:] if re.fullmatch(r"--?[A-Za-z][\w-]*", a)):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), f"{name}: {flag}"


@pytest.mark.parametrize("service", sorted(mizzen_commands()))
def test_command_flags_are_accepted(service):
    cmd = mizzen_commands()[service]
    result = subprocess.run(
        [sys.executable, "-m", "mizzen.services.cli.main", cmd[1], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    if result.returncode != 0 and re.search(r"ModuleNotFoundError|ImportError", result.stderr):
        pytest.skip(f"mizzen {cmd[1]} is not importable yet: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    for flag in (a for a in cmd[2:] if re.fullmatch(r"--?[A-Za-z][\w-]*", a)):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), (
            f"{service}: {flag} unknown to mizzen {cmd[1]}"
        )


def test_environment_variables_are_ones_the_services_read():
    known = env_names_read_by_services()
    # The scan finds what it should (settings.py and the bootstrap command's injector variables).
    assert {"MIZZEN_NATS_URL", "MIZZEN_REDIS_URL", "MIZZEN_SERVER", "POD_NAME", "INSTANCE_IP"} <= known
    for name, svc in mizzen_services().items():
        unknown = set(environment(svc)) - known - FOREIGN_ENV
        assert not unknown, f"{name}: no service reads {sorted(unknown)}"


def test_iptables_init_commands_run_in_dry_run():
    for name, svc in mizzen_services().items():
        cmd = svc["command"]
        if cmd[:2] != ["mizzen", "iptables"]:
            continue
        result = subprocess.run(
            [sys.executable, "-m", "mizzen.services.cli.main", "iptables", "--dry-run", *cmd[2:]],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert f"--to-ports {settings.PROXY_OUTBOUND_PORT}" in result.stdout
        assert f"--to-ports {settings.PROXY_INBOUND_PORT}" in result.stdout


# ---------------------------------------------------------------------------------------------------------
# ports and addresses


def test_ports_match_the_settings_defaults():
    svcs = services()
    registry = environment(svcs["registry"])
    assert int(registry["MIZZEN_REGISTRY_PORT"]) == settings.REGISTRY_PORT
    assert f"{settings.REGISTRY_PORT}:{settings.REGISTRY_PORT}" in svcs["registry"]["ports"]
    xds = environment(svcs["xds-gateway"])
    assert int(xds["MIZZEN_XDS_PORT"]) == settings.XDS_PORT
    assert f"{settings.XDS_PORT}:{settings.XDS_PORT}" in svcs["xds-gateway"]["ports"]

    # Each health check asks the port its service serves /healthz/ready on.
    assert urlsplit(healthcheck_url(svcs["registry"])).port == settings.REGISTRY_PORT
    assert urlsplit(healthcheck_url(svcs["translator"])).port == int(
        environment(svcs["translator"])["MIZZEN_TRANSLATOR_HTTP_PORT"]
    )
    assert urlsplit(healthcheck_url(svcs["xds-gateway"])).port == int(xds["MIZZEN_XDS_HTTP_PORT"])
    assert int(xds["MIZZEN_XDS_TLS_PORT"]) == settings.XDS_TLS_PORT
    assert f"{settings.XDS_TLS_PORT}:{settings.XDS_TLS_PORT}" in svcs["xds-gateway"]["ports"]
    ca = environment(svcs["certauth"])
    assert int(ca["MIZZEN_CA_PORT"]) == settings.CA_PORT
    assert urlsplit(healthcheck_url(svcs["certauth"])).port == int(ca["MIZZEN_CA_HTTP_PORT"])
    assert "certauth" in ca["MIZZEN_CA_DNS_NAMES"].split(",")  # the name the agents dial and check
    for name, svc in sidecars().items():
        assert urlsplit(healthcheck_url(svc)).port == settings.PROXY_HEALTH_PORT, name


def test_urls_name_the_right_services_and_ports():
    svcs = services()
    nats_port = 4222  # nats-server's default client port
    for name, svc in mizzen_services().items():
        env = environment(svc)
        if "MIZZEN_NATS_URL" in env:
            url = urlsplit(env["MIZZEN_NATS_URL"])
            assert (url.scheme, url.hostname, url.port) == ("nats", "nats", nats_port), name
            assert "nats" in depends_on(svc), name
        if "MIZZEN_REDIS_URL" in env:
            url = urlsplit(env["MIZZEN_REDIS_URL"])
            assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379), name
        if "MIZZEN_SERVER" in env:
            url = urlsplit(env["MIZZEN_SERVER"])
            assert (url.hostname, url.port) == ("registry", settings.REGISTRY_PORT), name
            assert "registry" in depends_on(svc), name
    for name, svc in sidecars().items():
        cmd = svc["command"]
        if cmd[1] == "agent":  # xDS over TLS with its token; certificates from certauth
            assert flag_value(cmd, "--xds") == f"xds-gateway:{settings.XDS_TLS_PORT}", name
            assert flag_value(cmd, "--ca") == f"certauth:{settings.CA_PORT}", name
            assert "certauth" in depends_on(svc), name
        else:
            assert flag_value(cmd, "--xds") == f"xds-gateway:{settings.XDS_PORT}", name
        assert "xds-gateway" in depends_on(svc), name
        zhost, zport = flag_value(cmd, "--zipkin").split(":")
        assert zhost == "jaeger"
        assert environment(svcs["jaeger"])["COLLECTOR_ZIPKIN_HOST_PORT"] == f":{zport}"
    otlp = flag_value(svcs["logsink"]["command"], "--otlp-endpoint")
    assert otlp == "jaeger:4317"
    assert "4317:4317" in svcs["jaeger"]["ports"]


def test_capture_rules_and_sidecar_uid_agree():
    svcs = services()
    for name, svc in sidecars().items():
        owner = svc["network_mode"].split(":", 1)[1]
        assert int(svc["user"]) == settings.PROXY_UID
        inits = [
            n
            for n, s in svcs.items()
            if s.get("network_mode") == f"service:{owner}" and s["command"][:2] == ["mizzen", "iptables"]
        ]
        assert len(inits) == 1, f"{owner} needs one iptables init container"
        init = svcs[inits[0]]
        assert inits[0] in depends_on(svc), f"{name} must wait for {inits[0]}"
        cmd = init["command"]
        assert int(flag_value(cmd, "-u")) == settings.PROXY_UID
        assert int(flag_value(cmd, "-p")) == settings.PROXY_OUTBOUND_PORT
        assert int(flag_value(cmd, "-z")) == settings.PROXY_INBOUND_PORT
        excluded = {int(p) for p in flag_value(cmd, "-d").split(",")}
        assert excluded == {
            settings.PROXY_PROMETHEUS_PORT,
            settings.PROXY_HEALTH_PORT,
            settings.PROXY_AGENT_PORT,
        }
        assert "NET_ADMIN" in init["cap_add"]


# ---------------------------------------------------------------------------------------------------------
# the demo pods against the demo mesh


def test_demo_mesh_is_valid():
    kinds = {o["kind"] for o in demo_objects()}
    assert {"Service", "Pod", "Endpoints"} <= kinds


def test_demo_pods_match_the_mesh():
    doc = compose()
    svcs = doc["services"]
    pods = by_kind("Pod")
    k8s_services = by_kind("Service")
    subnet_cfg = doc["networks"]["default"]["ipam"]["config"][0]
    subnet = ipaddress.ip_network(subnet_cfg["subnet"])
    dynamic = ipaddress.ip_network(subnet_cfg["ip_range"])
    cluster_ips = {s["spec"]["clusterIP"]: s for s in k8s_services.values()}
    seen_pods = set()
    for name, svc in sidecars().items():
        env = environment(svc)
        pod = pods[env["POD_NAME"]]
        seen_pods.add(env["POD_NAME"])
        assert pod["metadata"]["namespace"] == env["POD_NAMESPACE"]
        assert pod["status"]["podIP"] == env["INSTANCE_IP"]
        labels = dict(label.split("=", 1) for label in flag_values(svc["command"], "--label"))
        assert labels.items() <= pod["metadata"]["labels"].items(), name
        app = svcs[svc["network_mode"].split(":", 1)[1]]
        address = ipaddress.ip_address(app["networks"]["default"]["ipv4_address"])
        assert str(address) == env["INSTANCE_IP"]
        assert address in subnet and address not in dynamic  # never handed to another container
        # The app listens on its container port; Endpoints point at that pod IP and port.
        port = int(flag_value(app["command"], "--http"))
        assert port in {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
        endpoints = by_kind("Endpoints")
        assert any(
            a["ip"] == env["INSTANCE_IP"]
            and a["targetRef"]["name"] == env["POD_NAME"]
            and port in {p["port"] for p in s["ports"]}
            for e in endpoints.values()
            for s in e["subsets"]
            for a in s["addresses"]
        ), name
        # Its /etc/hosts maps other services to their ClusterIPs, and --next calls one of them on its port.
        for entry in app.get("extra_hosts") or []:
            host, ip = entry.split(":", 1)
            assert cluster_ips[ip]["metadata"]["name"] == host
        if "--next" in app["command"]:
            url = urlsplit(flag_value(app["command"], "--next"))
            target = k8s_services[url.hostname]
            assert url.port in {p["port"] for p in target["spec"]["ports"]}
            assert f"{url.hostname}:{target['spec']['clusterIP']}" in app["extra_hosts"]
    assert seen_pods == set(pods)


def test_sidecar_access_logs_reach_the_logsink():
    svcs = services()
    logsink = svcs["logsink"]
    files = set(flag_values(logsink["command"], "--file"))
    for name, svc in sidecars().items():
        path = flag_value(svc["command"], "--access-log")
        assert path in files, name
        mount = next(m for m in svc["volumes"] if path.startswith(m.split(":")[1]))
        assert mount.split(":")[0] in {m.split(":")[0] for m in logsink["volumes"]}, name


def test_sidecar_bootstraps_from_the_compose_file_pass_envoy_validation(tmp_path, monkeypatch):
    for name, svc in sidecars().items():
        for key, value in environment(svc).items():
            monkeypatch.setenv(key, value)
        argv = svc["command"][2:]
        out = tmp_path / f"{name}.json"
        argv = [*argv[: argv.index("-o")], "-o", str(out)]  # same flags, a local file, no --exec
        if svc["command"][1] == "agent":  # the bootstrap the agent writes from these flags (with a token)
            from mizzen.services.sidecar import agent

            args = agent.build_parser().parse_args(argv)
            config = agent.bootstrap_config(args, "a.workload.token")
            out.write_text(json.dumps(config))
            xds = next(c for c in config["static_resources"]["clusters"] if c["name"] == "xds-grpc")
            assert xds["transport_socket"]["name"] == "envoy.transport_sockets.tls", name
        else:
            assert bootstrap_cli.main(argv) == 0
            config = json.loads(out.read_text())
        env = environment(svc)
        assert config["node"]["id"] == (
            f"sidecar~{env['INSTANCE_IP']}~{env['POD_NAME']}.{env['POD_NAMESPACE']}~{env['POD_NAMESPACE']}.svc.cluster.local"
        )
        result = subprocess.run(
            [procs.envoy_binary(), "--mode", "validate", "-c", str(out), "-l", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"


# ---------------------------------------------------------------------------------------------------------
# the demo app itself


@contextlib.contextmanager
def demo_app(tmp_path: Path, *args: str):
    port = procs.free_port()
    proc = procs.spawn(
        f"demo-{port}",
        [sys.executable, "-m", "mizzen.services.demo.echo", "serve", "--bind", "127.0.0.1", "--http", str(port), *args],
        tmp_path / "logs",
    )
    try:
        procs.wait_port("127.0.0.1", port, proc=proc.popen)
        yield port
    finally:
        proc.stop()


def test_demo_app_calls_the_next_hop_and_forwards_the_request_id(tmp_path):
    with (
        demo_app(tmp_path, "--name", "app-b") as b_port,
        demo_app(tmp_path, "--name", "app-a", "--next", f"http://127.0.0.1:{b_port}/") as a_port,
    ):
        req = urllib.request.Request(
            f"http://127.0.0.1:{a_port}/x", headers={"x-request-id": "rid-123", "x-b3-sampled": "1"}
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    reply = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    assert reply["service"] == "app-a"
    assert reply["path"] == "/x"
    assert reply["next"]["status"] == 200
    assert reply["next"]["body"]["service"] == "app-b"
    assert reply["next"]["body"]["headers"]["x-request-id"] == "rid-123"
    assert reply["next"]["body"]["headers"]["x-b3-sampled"] == "1"
