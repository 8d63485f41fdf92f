"""deploy/ holds together without a Docker engine or a cluster: every file parses, every
`leadflow` command it runs exists, every image is pinned, every metric a dashboard or an alert
queries is one the code exports, every configuration key and LEADFLOW_* variable is one the
settings model knows, and probes and scrape targets point at ports and paths that are served.

What this cannot show: that the images pull, the containers start and the services talk to
each other. `kubectl kustomize` renders the Kubernetes manifests when kubectl is installed.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from leadflow import __version__
from leadflow.cli import ROLES, app
from leadflow.rules import defaults_of
from leadflow.rules import load as load_rules
from leadflow.settings import Settings, env_names, load_settings
from leadflow.web import WebContext, create_app, create_probe_app

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "leadflow.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
PRODUCTION_NOTES = ROOT / "docs" / "production.md"
#: Where compose mounts deploy/ in every leadflow container.
COMPOSE_MOUNT = PurePosixPath("/deploy")


# --- reading deploy/ -------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def leadflow_services() -> dict[str, dict[str, Any]]:
    """Compose services running the leadflow image."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if str(service.get("image", "")).startswith("leadflow:")
    }


def k8s_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    objects = []
    for resource in kustomization["resources"]:
        objects.extend(load_yaml_docs(K8S / resource))
    return objects


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for obj in k8s_objects() if obj["kind"] == kind]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def leadflow_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, container) for every container of the leadflow image in the manifests."""
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            for container in pod_spec(obj)["containers"]:
                if container["image"].split(":")[0] == "leadflow":
                    yield obj, container


def role_of(obj: dict[str, Any]) -> str:
    component: str = obj["metadata"]["labels"]["app.kubernetes.io/component"]
    return component


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in container.get("env", [])}


def secret_example() -> dict[str, str]:
    (secret,) = load_yaml_docs(K8S / "secret.example.yaml")
    return {key: str(value) for key, value in secret["stringData"].items()}


def compose_value(value: Any) -> str:
    """A compose environment value with ${VAR:-default} interpolated to its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def compose_environ(service: dict[str, Any]) -> dict[str, str]:
    return {key: compose_value(value) for key, value in (service.get("environment") or {}).items()}


def compose_settings(service: dict[str, Any]) -> Settings:
    environ = compose_environ(service)
    config = PurePosixPath(environ["LEADFLOW_CONFIG"])
    assert config.is_relative_to(COMPOSE_MOUNT), config
    return load_settings(DEPLOY / config.relative_to(COMPOSE_MOUNT), environ=environ)


def k8s_settings(container: dict[str, Any] | None = None) -> Settings:
    environ = secret_example() | (container_env(container) if container else {})
    return load_settings(K8S / "config" / "leadflow.yaml", environ=environ)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\")
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            lines.append((keyword.upper(), rest.strip()))
            pending = ""
    return lines


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            for match in re.finditer(r"(\w+)=(\S+)", rest):
                env[match[1]] = match[2]
    return env


def dockerfile_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    copies = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in rest:
            *sources, destination = rest.split()
            copies.append(([s for s in sources if not s.startswith("--")], destination))
    return copies


# --- everything parses -----------------------------------------------------------------------


def test_every_yaml_and_json_file_under_deploy_parses() -> None:
    yamls = yaml_files()
    assert DEPLOY / "docker-compose.yml" in yamls
    assert K8S / "kustomization.yaml" in yamls
    for path in yamls:
        assert load_yaml_docs(path), f"{path} is empty"
    jsons = sorted(DEPLOY.rglob("*.json"))
    assert DASHBOARD in jsons
    for path in jsons:
        json.loads(path.read_text(encoding="utf-8"))


def test_every_manifest_has_a_kind_and_a_name_and_kustomize_lists_every_one() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk
    for obj in k8s_objects():
        assert obj["apiVersion"]
        assert obj["kind"]
        assert obj["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc]
    config_maps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "leadflow"
        if obj["kind"] in ("Deployment", "Job"):
            spec = pod_spec(obj)
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps
            for container in spec["containers"]:
                name, _, tag = container["image"].rpartition(":")
                assert name, container["image"]
                assert tag not in ("", "latest"), container["image"]


# --- commands --------------------------------------------------------------------------------


def check_command(args: list[str]) -> list[str]:
    """`leadflow ARGS` names a command of the CLI with options it takes; return the command's
    path. The CLI parses ARGS with --help added, which shows the command's usage instead of
    running it."""
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, f"`leadflow {' '.join(args)}`: {result.output}"
    usage = re.search(r"Usage: leadflow ((?:[a-z][\w-]* )*)", result.output)
    assert usage is not None, result.output
    path = usage[1].split()
    if path == ["run"]:
        role = next(arg for arg in args[args.index("run") + 1 :] if not arg.startswith("-"))
        assert role in ROLES, f"`leadflow {' '.join(args)}`: unknown role {role}"
    return path


def documented_commands() -> list[list[str]]:
    """`docker compose ... run --rm SERVICE ARGS` and `docker run ... IMAGE ARGS` lines."""
    found = []
    texts = [COMPOSE_FILE, DOCKERFILE, PRODUCTION_NOTES, ROOT / "README.md"]
    for path in texts:
        for match in re.finditer(
            r"docker compose(?: -f \S+)? run --rm \w+ ([^\n`#]+)", path.read_text("utf-8")
        ):
            found.append(match[1].split())
        for match in re.finditer(
            r"docker run [^\n]*?leadflow:[\w.]+ ([^\n`#]+)", path.read_text("utf-8")
        ):
            found.append(match[1].split())
    return found


def test_commands_in_compose_kubernetes_and_the_dockerfile_are_real() -> None:
    commands = [service["command"] for service in leadflow_services().values()]
    commands += [container["args"] for _, container in leadflow_containers()]
    instructions = dict(dockerfile_instructions())
    assert json.loads(instructions["ENTRYPOINT"]) == ["leadflow"]
    commands.append(json.loads(instructions["CMD"]))
    commands += documented_commands()
    paths = [check_command(args) for args in commands]
    assert ["db", "upgrade"] in paths
    assert ["agents", "import"] in paths


def test_the_command_checker_refuses_what_the_cli_refuses() -> None:
    with pytest.raises(AssertionError, match="unknown role"):
        check_command(["run", "dialer"])
    with pytest.raises(AssertionError, match="No such option"):
        check_command(["db", "upgrade", "--no-such-option"])
    with pytest.raises(AssertionError, match="No such command"):
        check_command(["db", "downgrade"])
    assert check_command(["-c", "x.yaml", "agents", "token", "--role", "ops"]) == [
        "agents",
        "token",
    ]


def test_every_role_runs_in_compose_and_in_kubernetes() -> None:
    in_compose = {
        service["command"][1]
        for service in leadflow_services().values()
        if service["command"][0] == "run"
    }
    in_k8s = {
        container["args"][1]
        for _, container in leadflow_containers()
        if container["args"][0] == "run"
    }
    assert in_compose == set(ROLES)
    assert in_k8s == set(ROLES)
    for obj, container in leadflow_containers():
        if obj["kind"] == "Deployment":
            assert role_of(obj) == container["args"][1]


def test_migrations_run_before_the_roles_in_compose() -> None:
    services = compose()["services"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name, service in leadflow_services().items():
        if name != "migrate":
            assert service["depends_on"]["migrate"]["condition"] == (
                "service_completed_successfully"
            )
    (job,) = k8s_kind("Job")
    assert pod_spec(job)["containers"][0]["args"] == ["db", "upgrade"]


# --- images and the Dockerfile ---------------------------------------------------------------


def pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_every_image_is_pinned() -> None:
    for name, service in compose()["services"].items():
        assert pinned(service["image"]), f"compose service {name}: {service['image']}"
    for service in leadflow_services().values():
        assert service["image"] == f"leadflow:{__version__}"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    retagged = {image["name"]: image for image in kustomization.get("images", [])}
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            for container in pod_spec(obj)["containers"]:
                image = container["image"]
                override = retagged.get(image)
                if override is not None:
                    assert override.get("digest") or override.get("newTag") not in (None, "latest")
                else:
                    assert pinned(image), image
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
        if keyword == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
            assert pinned(image), f"FROM {image}"


def dockerignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch(prefix, pattern) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_the_dockerfile_copies_what_exists_and_every_package() -> None:
    copied = set()
    for sources, _ in dockerfile_copies():
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
            copied.add(source)
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include = \[([^\]]*)\]", pyproject)
    assert include is not None
    packages = {name.strip().strip('"').rstrip("*") for name in include[1].split(",")}
    assert packages <= copied, f"packages the wheel needs but not copied: {packages - copied}"
    assert {"pyproject.toml", "README.md"} <= copied


def test_the_image_runs_as_a_non_root_user_with_its_configuration() -> None:
    instructions = dockerfile_instructions()
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    env = dockerfile_env()
    config = PurePosixPath(env["LEADFLOW_CONFIG"])
    destinations = {PurePosixPath(dest): sources[0] for sources, dest in dockerfile_copies()}
    assert destinations[config] == "deploy/leadflow.docker.yaml"
    baked = load_settings(ROOT / destinations[config], environ={})
    assert baked.classification.rules_file is not None
    rules_name = baked.classification.rules_file.name
    assert destinations[config.parent / rules_name] == f"deploy/{rules_name}"
    # Pods run it as that user: Kubernetes can only check runAsNonRoot against a numeric UID.
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            security = pod_spec(obj)["securityContext"]
            assert security["runAsNonRoot"] is True
            assert str(security["runAsUser"]) == uid


# --- configuration ---------------------------------------------------------------------------


def leadflow_yamls() -> list[Path]:
    return [
        DEPLOY / "leadflow.example.yaml",
        DEPLOY / "leadflow.docker.yaml",
        K8S / "config" / "leadflow.yaml",
    ]


@pytest.mark.parametrize("path", leadflow_yamls(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_leadflow_yaml_loads_with_rules_that_load(path: Path) -> None:
    settings = load_settings(path, environ=secret_example())
    rules = settings.classification.rules_file
    if rules is not None:
        assert rules.is_file(), f"{path}: classification.rules_file {rules} does not exist"
        load_rules(rules, defaults_of(settings))


def test_every_leadflow_variable_is_a_settings_key() -> None:
    known = set(env_names().values()) | {"LEADFLOW_CONFIG"}
    used: dict[str, set[str]] = {}
    for name, service in leadflow_services().items():
        used[f"compose {name}"] = {k for k in compose_environ(service) if k.startswith("LEADFLOW_")}
    for obj, container in leadflow_containers():
        used[f"k8s {obj['metadata']['name']}"] = set(container_env(container))
    used["k8s secret"] = {k for k in secret_example() if k.startswith("LEADFLOW_")}
    used["Dockerfile"] = {k for k in dockerfile_env() if k.startswith("LEADFLOW_")}
    for where, names in used.items():
        assert names <= known, f"{where}: not settings keys: {sorted(names - known)}"
    # And they take effect: the environment of each service and pod builds valid settings.
    for service in leadflow_services().values():
        settings = compose_settings(service)
        assert settings.database.url is not None
        assert settings.kafka.bootstrap is not None
    for _, container in leadflow_containers():
        settings = k8s_settings(container)
        assert settings.database.url is not None
        assert settings.kafka.bootstrap is not None
        assert settings.kafka.sasl_password is not None


def test_intake_workers_do_not_outnumber_the_partitions_and_loaders_match_lanes() -> None:
    services = leadflow_services()
    intake = services["intake"]
    settings = compose_settings(intake)
    assert intake["deploy"]["replicas"] <= settings.topics.partitions
    assert settings.staging.lanes == services["staging"].get("deploy", {}).get("replicas", 1)
    settings = k8s_settings()
    replicas = {role_of(d): d["spec"]["replicas"] for d in k8s_kind("Deployment")}
    assert replicas["intake"] <= settings.topics.partitions
    assert settings.staging.lanes == replicas["staging"]
    # Leader-elected roles have a hot standby; the rest run several replicas too.
    assert all(count >= 2 for count in replicas.values())


# --- probes and scrape targets ---------------------------------------------------------------


def served_paths(*, web: bool) -> set[str]:
    settings = load_settings(K8S / "config" / "leadflow.yaml", environ=secret_example())
    engine = sa.create_engine("postgresql+psycopg://leadflow@127.0.0.1:1/leadflow")  # never used
    context = WebContext(settings, engine)
    application = create_app(context) if web else create_probe_app(context, role="intake")
    return {str(getattr(route, "path", "")) for route in application.routes}


def test_probes_and_healthchecks_use_paths_the_apps_serve() -> None:
    worker_paths, web_paths = served_paths(web=False), served_paths(web=True)
    assert {"/healthz", "/readyz", "/metrics"} <= worker_paths
    for obj, container in leadflow_containers():
        if obj["kind"] != "Deployment":
            continue
        paths = web_paths if role_of(obj) == "web" else worker_paths
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in paths
            assert get["port"] in ports
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for name, service in leadflow_services().items():
        if name == "migrate":
            continue
        test = " ".join(service["healthcheck"]["test"])
        match = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", test)
        assert match is not None, name
        assert match[2] == "/healthz"
        assert int(match[1]) == probe_port(service, name)


def probe_port(service: dict[str, Any], name: str) -> int:
    """The port a compose service serves /healthz and /metrics on."""
    settings = compose_settings(service)
    if name == "web":
        return settings.web.port
    assert settings.web.metrics_port is not None, f"{name} serves no probes"
    return settings.web.metrics_port


def test_prometheus_scrapes_every_role_where_it_serves_metrics() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    services = leadflow_services()
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A"
            for name in sd["names"]:
                scraped[name] = sd["port"]
    roles = {name for name, s in services.items() if s["command"][0] == "run"}
    assert roles <= set(scraped), f"not scraped: {roles - set(scraped)}"
    for name, port in scraped.items():
        assert port == probe_port(services[name], name), name
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_kubernetes_metrics_services_match_the_pods_ports() -> None:
    services = {s["metadata"]["name"]: s for s in k8s_kind("Service")}
    deployments = {role_of(d): d for d in k8s_kind("Deployment")}
    settings = k8s_settings()
    for role, deployment in deployments.items():
        (container,) = pod_spec(deployment)["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if role == "web":
            service = services["leadflow-web"]
            assert ports["http"] == settings.web.port
            assert service["spec"]["ports"][0]["targetPort"] == "http"
            assert int(service["metadata"]["annotations"]["prometheus.io/port"]) == ports["http"]
        else:
            service = services["leadflow-metrics"]
            env = container_env(container)
            assert int(env["LEADFLOW_WEB_METRICS_PORT"]) == ports["metrics"]
            (port,) = service["spec"]["ports"]
            assert port["targetPort"] == "metrics"
            assert port["port"] == ports["metrics"]
            assert int(service["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"]
        assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items(), f"{service['metadata']['name']} misses {role}"
    web_labels = deployments["web"]["spec"]["template"]["metadata"]["labels"]
    assert not services["leadflow-metrics"]["spec"]["selector"].items() <= web_labels.items()


def test_every_role_has_a_disruption_budget_and_limits() -> None:
    budgets = {role_of(b) for b in k8s_kind("PodDisruptionBudget")}
    deployments = k8s_kind("Deployment")
    assert budgets == {role_of(d) for d in deployments}
    for obj in [*deployments, *k8s_kind("Job")]:
        for container in pod_spec(obj)["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"])
            assert "memory" in resources["limits"]
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/app", "/tmp", "/etc/leadflow"} <= mounts  # the writable places and config


# --- metric names ----------------------------------------------------------------------------


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the code exports, with its label names: modules that create metrics
    are found by their source, imported, and read back from the default registry."""
    for package in ("ingest", "allocate", "sync", "classify", "leadflow", "schemas"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if "from prometheus_client import" in text and re.search(
                r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"", text
            ):
                importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "unknown": ("",),
    }
    labels_of: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):  # label names have no public accessor
        labelnames = set(getattr(collector, "_labelnames", ()))
        for family in collector.describe() if hasattr(collector, "describe") else []:
            for suffix in suffixes.get(family.type, ("",)):
                names = labelnames | ({"le"} if suffix == "_bucket" else set())
                labels_of.setdefault(family.name + suffix, set()).update(names)
    for family in REGISTRY.collect():
        for sample in family.samples:
            labels_of.setdefault(sample.name, set()).update(sample.labels)
    return labels_of


#: Series Prometheus adds to every target, and labels every series carries.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
TARGET_LABELS = {"job", "instance"}
PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan", "atan2",
}  # fmt: skip


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to; functions, keywords, numbers,
    durations and Grafana variables left out."""
    text = re.sub(r"\$__\w+", "5m", expr)
    labels: set[str] = set()
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', text)
    for block in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", block))
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for clause in re.findall(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text
    ):
        labels.update(name.strip() for name in clause.split(",") if name.strip())
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    metrics = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        name, call = match[1], match[2]
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        metrics.add(name)
    return metrics, labels


def test_the_promql_reader_finds_metrics_and_labels() -> None:
    metrics, labels = promql_names(
        "histogram_quantile(0.99, sum by (le, queue) (rate(leadflow_speed_to_lead_seconds_bucket"
        '{queue=~"$queue"}[$__rate_interval]))) > 1e3 and on() up{job="x"} offset 5m'
    )
    assert metrics == {"leadflow_speed_to_lead_seconds_bucket", "up"}
    assert labels == {"le", "queue", "job"}


def dashboard_queries() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+(?:\{[^}]*\})?),\s*(\w+)\)", query)
            assert match is not None, f"variable {variable['name']}: {query}"
            yield f"variable {variable['name']}", f"{match[1]}{{{match[2]}!=''}}"


def alert_queries() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported() -> None:
    exported = exported_metrics()
    assert "leadflow_intake_events_total" in exported
    assert "leadflow_speed_to_lead_seconds_bucket" in exported
    queries = [*dashboard_queries(), *alert_queries()]
    assert len(queries) > 30
    for where, expr in queries:
        metrics, labels = promql_names(expr)
        assert metrics, f"{where}: no metric in {expr!r}"
        unknown = metrics - set(exported) - PROMETHEUS_SERIES
        assert not unknown, f"{where}: not exported by leadflow: {sorted(unknown)}"
        known_labels = TARGET_LABELS.union(*(exported.get(m, set()) for m in metrics))
        assert labels <= known_labels, f"{where}: no such labels: {sorted(labels - known_labels)}"


def test_the_dashboard_is_complete_and_provisioned() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    queried = {m for _, expr in dashboard_queries() for m in promql_names(expr)[0]}
    for wanted in (
        "leadflow_intake_events_total",
        "leadflow_intake_rejects_total",
        "leadflow_intake_batch_seconds_bucket",
        "leadflow_intake_consumer_lag",
        "leadflow_assignments_total",
        "leadflow_queue_depth",
        "leadflow_queue_oldest_seconds",
        "leadflow_sla_expired_total",
        "leadflow_speed_to_lead_seconds_bucket",
        "leadflow_relay_backlog",
        "leadflow_relay_held",
        "leadflow_relay_leader",
        "leadflow_poller_last_success_timestamp_seconds",
        "leadflow_poller_consecutive_failures",
        "leadflow_http_requests_total",
        "leadflow_analytics_up",
        "leadflow_rules_reloads_total",
    ):
        assert wanted in queried, f"the dashboard shows no {wanted}"
    grafana = compose()["services"]["grafana"]
    (provider,) = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "leadflow.yml").read_text()
    )["providers"]
    dashboards_dir = PurePosixPath(provider["options"]["path"])
    mounted = {
        PurePosixPath(target): source
        for source, target, *_ in (volume.split(":") for volume in grafana["volumes"])
    }
    assert mounted[dashboards_dir / DASHBOARD.name] == "./grafana/leadflow.json"
    assert mounted[PurePosixPath("/etc/grafana/provisioning")] == "./grafana/provisioning"
    (source,) = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_every_alert_is_explained_in_the_production_notes() -> None:
    notes = PRODUCTION_NOTES.read_text(encoding="utf-8")
    for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]
            assert f"`{rule['alert']}`" in notes, f"{rule['alert']} is not in docs/production.md"
