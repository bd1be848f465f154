"""The Helm chart (helm/neuron-serve): lint, render, API-schema validation and the contracts the
rendered objects must keep.

No cluster runs here: the chart is rendered offline with Helm's Go SDK (``helm-python-sdk``, import
name ``helm_python``; there is no helm binary) and every rendered object is validated with
``kubernetes-validate --strict`` against the API schemas of Kubernetes 1.29 to 1.33 that the package
ships (no network). What needs a cluster (scheduling, the device plugins, probes against a live
server) is not tested here; docs/OPERATIONS.md says so.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def _require(module: str, package: str):
    # In CI (CI set) a missing test dependency is an error, not a silent skip of the chart tests.
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{package} not installed (pip install -e .[dev])")


helm = _require("helm_python", "helm-python-sdk")
kv = _require("kubernetes_validate", "kubernetes-validate")
yaml = _require("yaml", "pyyaml")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "neuron-serve"
CI_VALUES = CHART / "ci"
RELEASE = "rel"
NAMESPACE = "serving"

PROFILES = ("default", "neuron", "gpu", "cpu")
K8S_VERSIONS = ("1.29", "1.30", "1.31", "1.32", "1.33")
# Objects of CRDs (Prometheus Operator) have no schema in kubernetes-validate; the test lists them
# explicitly so that nothing else is silently skipped.
CRD_KINDS = {"ServiceMonitor"}

EXEC_SERVICE = "neuronserve.exec.v1.ExecService"
PREP_SERVICE = "neuronserve.prep.v1.PrepService"


# ------------------------------------------------------------------------------------------ helpers


def profile_values(profile: str) -> dict[str, Any] | None:
    if profile == "default":
        return None
    return yaml.safe_load((CI_VALUES / f"{profile}-values.yaml").read_text())


def deep_merge(base: dict[str, Any] | None, override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base) if base else {}
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@functools.lru_cache(maxsize=1)
def _chart():
    return helm.Chart.load(str(CHART))


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """All rendered objects (NOTES.txt excluded), in a stable order."""
    out = _chart().render(values=values, name=RELEASE, namespace=NAMESPACE)
    objs = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        objs.extend(d for d in yaml.safe_load_all(out[path]) if d)
    return objs


@functools.cache
def _render_profile_json(profile: str) -> str:
    return json.dumps(render(profile_values(profile)))


def render_profile(profile: str) -> list[dict[str, Any]]:
    return json.loads(_render_profile_json(profile))


def notes(values: dict[str, Any] | None = None) -> str:
    out = _chart().render(values=values, name=RELEASE, namespace=NAMESPACE)
    return next(v for k, v in out.items() if k.endswith("NOTES.txt"))


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objs, kind, name)
    assert len(found) == 1, (
        f"expected one {kind} {name}, got {[o['metadata']['name'] for o in find(objs, kind)]}"
    )
    return found[0]


def exec_deploy(objs):
    return one(objs, "Deployment", f"{RELEASE}-neuron-serve-exec")


def prep_deploy(objs):
    return one(objs, "Deployment", f"{RELEASE}-neuron-serve-prep")


def configmap(objs) -> dict[str, str]:
    return one(objs, "ConfigMap", f"{RELEASE}-neuron-serve-config")["data"]


def pod_specs(objs) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every pod template (Deployments and Jobs)."""
    return [
        (f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
        for o in objs
        if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")
    ]


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def expand_args(c: dict[str, Any], cm: dict[str, str]) -> list[str]:
    """The container's args as the kubelet passes them: $(VAR) expanded from the ConfigMap."""
    env = dict(cm)
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a) for a in c["args"]]


def arg_value(args: list[str], flag: str) -> str:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def expect_rejected(values: dict[str, Any], *needles: str) -> str:
    with pytest.raises(helm.HelmError) as ei:
        render(values)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in error message: {msg}"
    return msg


# ------------------------------------------------------------------------- lint / render / validate


@pytest.mark.parametrize("profile", PROFILES)
def test_lint_clean(profile):
    report = helm.lint(str(CHART), profile_values(profile), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); nothing at warning (2) or error (3).
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("profile", PROFILES)
def test_renders(profile):
    objs = render_profile(profile)
    kinds = {o["kind"] for o in objs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= kinds
    for o in objs:
        assert o["metadata"]["namespace"] == NAMESPACE
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "neuron-serve"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert "helm.sh/chart" in labels
        assert len(o["metadata"]["name"]) <= 63


def test_kubernetes_validate_ships_the_versions():
    shipped = {kv.utils.major_minor(v) for v in kv.utils.all_versions()}
    assert set(K8S_VERSIONS) <= shipped


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_objects_pass_kubernetes_validate_strict(profile, version):
    objs = render_profile(profile)
    checked = 0
    for o in objs:
        if o["kind"] in CRD_KINDS:
            continue
        try:
            validated = kv.validate(o, version, strict=True)
        except kv.utils.ValidationError as e:
            pytest.fail(
                f"{o['kind']}/{o['metadata']['name']} invalid for {version} at "
                f"{list(e.caught.absolute_path)}: {e.caught.message}"
            )
        assert validated == version  # validated against this very version's schema
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("component", ["exec", "prep"])
def test_components_can_be_disabled(component):
    objs = render(
        {component: {"enabled": False}, "prepareJob": {"enabled": True, "models": [{"source": "x"}]}}
    )
    names = [o["metadata"]["name"] for o in objs]
    assert not [n for n in names if n.endswith(f"-{component}") or n.endswith(f"-{component}-headless")]
    other = "prep" if component == "exec" else "exec"
    assert find(objs, "Deployment", f"{RELEASE}-neuron-serve-{other}")
    for o in objs:
        kv.validate(o, K8S_VERSIONS[-1], strict=True)


def test_every_ci_values_file_is_a_tested_profile():
    files = sorted(p.name for p in CI_VALUES.glob("*-values.yaml"))
    assert files == sorted(f"{p}-values.yaml" for p in PROFILES if p != "default")


# ----------------------------------------------------------------------------------- schema checks


@pytest.mark.parametrize(
    ("values", "where"),
    [
        # wrong types
        ({"exec": {"tp": "2"}}, "/exec/tp"),
        ({"exec": {"replicas": "1"}}, "/exec/replicas"),
        ({"exec": {"graphs": "always"}}, "/exec/graphs"),
        ({"prepareJob": {"compileGraphs": "yes"}}, "/prepareJob/compileGraphs"),
        ({"exec": {"contextBuckets": ["128"]}}, "/exec/contextBuckets"),
        ({"exec": {"maxBatchSize": 1.5}}, "/exec/maxBatchSize"),
        ({"prep": {"maxWorkers": True}}, "/prep/maxWorkers"),
        ({"server": {"grpcPort": "grpc"}}, "/server/grpcPort"),
        ({"networkPolicy": {"enabled": "true"}}, "/networkPolicy/enabled"),
        ({"exec": {"resources": {"requests": {"memory": "lots"}}}}, "/exec/resources/requests/memory"),
        ({"prepareJob": {"models": "Qwen/Qwen2.5-0.5B"}}, "/prepareJob/models"),
        # unknown keys, at every level
        ({"replicaCount": 2}, "replicaCount"),
        ({"exec": {"replica": 2}}, "replica"),
        ({"exec": {"accelerators": {"neuron": {"resource": "aws.amazon.com/neuron"}}}}, "resource"),
        ({"exec": {"probes": {"readiness": {"initialDelay": 5}}}}, "initialDelay"),
        ({"prepareJob": {"models": [{"source": "x", "tensorParallel": 2}]}}, "tensorParallel"),
        ({"tls": {"enable": True}}, "enable"),
        # out of range
        ({"exec": {"replicas": -1}}, "/exec/replicas"),
        ({"prep": {"replicas": -1}}, "/prep/replicas"),
        ({"exec": {"tp": 0}}, "/exec/tp"),
        ({"exec": {"autoscaling": {"minReplicas": 0}}}, "/exec/autoscaling/minReplicas"),
        ({"exec": {"drainTimeoutSeconds": -5}}, "/exec/drainTimeoutSeconds"),
        ({"server": {"metricsPort": 70000}}, "/server/metricsPort"),
        ({"exec": {"httpPort": 70000}}, "/exec/httpPort"),
        ({"exec": {"httpPort": "8000"}}, "/exec/httpPort"),
        ({"exec": {"contextBuckets": [1]}}, "/exec/contextBuckets"),
        # bad enums / patterns
        ({"exec": {"profile": "tpu"}}, "/exec/profile"),
        ({"exec": {"accelerators": {"gpu": {"resourceName": "amd.com/gpu"}}}}, "resourceName"),
        ({"exec": {"accelerators": {"neuron": {"target": "inf2"}}}}, "target"),
        ({"prepareJob": {"models": [{"source": "x", "dtype": "int8"}]}}, "dtype"),
        ({"prepareJob": {"models": [{"source": "x", "quantize": "int4"}]}}, "quantize"),
        ({"prepareJob": {"models": [{"tp": 2}]}}, "source"),
        ({"store": {"uri": "gs://bucket/x"}}, "/store/uri"),
        ({"exec": {"model": "manifest.json"}}, "/exec/model"),
        ({"serviceAccount": {"irsaRoleArn": "my-role"}}, "/serviceAccount/irsaRoleArn"),
        # the security posture cannot be switched off by values
        ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
        ({"podSecurityContext": {"runAsUser": 0}}, "runAsUser"),
        ({"containerSecurityContext": {"allowPrivilegeEscalation": True}}, "allowPrivilegeEscalation"),
        ({"containerSecurityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
        ({"containerSecurityContext": {"privileged": True}}, "privileged"),
        ({"containerSecurityContext": {"capabilities": {"drop": ["NET_RAW"]}}}, "capabilities"),
        ({"containerSecurityContext": {"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}}, "add"),
    ],
)
def test_schema_rejects_bad_values(values, where):
    expect_rejected(values, "schema", where)


def _schema_node(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follows $ref and single-element allOf wrappers."""
    while True:
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        elif "allOf" in node and len(node["allOf"]) == 1:
            node = node["allOf"][0]
        else:
            return node


def test_schema_declares_every_value():
    """Every key of values.yaml is declared in the schema, down to the leaves; every declared object
    refuses unknown keys, except Kubernetes objects passed through as is (validated after rendering)."""
    jsonschema = _require("jsonschema", "jsonschema (a kubernetes-validate dependency)")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    passthrough = []

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = _schema_node(schema, node)
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for k, v in value.items():
                assert k in node["properties"], f"{path}.{k} is not declared in values.schema.json"
                walk(v, node["properties"][k], f"{path}.{k}")
        elif isinstance(value, dict):
            assert node.get("type") == "object", path
            if "additionalProperties" not in node:
                passthrough.append(path)
        else:
            assert node, f"{path} has no schema"

    walk(defaults, schema, "")
    # The only free-form objects are Kubernetes API objects.
    assert all(p.rsplit(".", 1)[1] in {"affinity", "behavior"} for p in passthrough), passthrough


def test_schema_accepts_defaults_and_profiles():
    chart = _chart()
    chart.validate_schema(chart.values)
    for p in PROFILES:
        chart.validate_schema(chart.merge_values(profile_values(p)))


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        (
            {"exec": {"drainTimeoutSeconds": 120, "terminationGracePeriodSeconds": 60}},
            "terminationGracePeriodSeconds",
        ),
        (
            {"prep": {"drainTimeoutSeconds": 300, "terminationGracePeriodSeconds": 302}},
            "terminationGracePeriodSeconds",
        ),
        (
            {"exec": {"maxSeqLen": 3000, "contextBuckets": [128, 1024]}},
            "multiple of the largest context bucket",
        ),
        (
            {"exec": {"maxSeqLen": 256, "contextBuckets": [64, 512]}},
            "multiple of the largest context bucket",
        ),
        (
            {"exec": {"maxSeqLen": 2048, "kvBuckets": [512, 1024]}},
            "the largest KV bucket (1024) must equal exec.maxSeqLen (2048)",
        ),
        (
            {"exec": {"maxBatchSize": 8, "batchBuckets": [1, 4]}},
            "the largest batch bucket (4) must equal exec.maxBatchSize (8)",
        ),
        ({"exec": {"speculation": "draft"}}, "exec.draftModel: needed by exec.speculation draft"),
        ({"exec": {"draftModel": "file:///s/m.json"}}, "exec.draftModel: needed by exec.speculation draft"),
        ({"tls": {"enabled": True}}, "tls.secretName"),
        ({"prepareJob": {"enabled": True}}, "prepareJob.models"),
        (
            {"prepareJob": {"enabled": True, "models": [{"source": "x", "quantizeLmHead": True}]}},
            "quantizeLmHead needs quantize",
        ),
        ({"exec": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}, "minReplicas"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
        (
            {"exec": {"httpPort": 50051}},
            "exec.httpPort (50051) must differ from the gRPC, metrics and health",
        ),
        (
            {"exec": {"httpPort": 50052}, "tls": {"enabled": True, "secretName": "s"}},
            "exec.httpPort (50052) must differ",
        ),
    ],
)
def test_template_rejects_inconsistent_values(values, needle):
    expect_rejected(values, needle)


@pytest.mark.parametrize(
    ("shape", "context", "kv", "batch"),
    [
        ({"maxSeqLen": 256, "contextBuckets": []}, (64, 256), (64, 128, 256), (1, 2, 4, 8)),
        (
            {
                "maxSeqLen": 2048,
                "maxBatchSize": 6,
                "contextBuckets": [64, 256],
                "kvBuckets": [256, 1024, 2048],
                "batchBuckets": [2, 6],
            },
            (64, 256),
            (256, 1024, 2048),
            (2, 6),
        ),
    ],
)
def test_rendered_serving_shape_is_the_one_exec_server_serves(shape, context, kv, batch):
    """Empty buckets leave the flags out (exec-server derives them); the rendered args give the same
    shape the exec server's own parser and rules produce."""
    from exec_service.cli import serving_shape_from_args
    from shared.cli import build_parser

    objs = render({"exec": shape})
    args = expand_args(container(exec_deploy(objs)), configmap(objs))
    assert ("--context-buckets" in " ".join(args)) == bool(shape["contextBuckets"])
    assert ("--kv-buckets" in " ".join(args)) == bool(shape.get("kvBuckets"))
    assert ("--batch-buckets" in " ".join(args)) == bool(shape.get("batchBuckets"))
    parser = build_parser()
    ns = parser.parse_args(args)
    got = serving_shape_from_args(ns, parser)
    assert (got.context_buckets, got.kv_buckets, got.batch_buckets) == (context, kv, batch)


def test_speculation_values_reach_exec_server_and_the_compiled_graph_set():
    """exec.speculation / numSpeculativeTokens / draftModel become exec-server's flags (parsed by the
    real CLI into the same serving shape) and the compile job's, so its graph set holds the verify
    graphs; off leaves the flags out."""
    from exec_service.cli import serving_shape_from_args
    from shared.cli import build_parser

    parser = build_parser()
    off = expand_args(container(exec_deploy(render({}))), configmap(render({})))
    assert not any(a.startswith(("--speculation", "--draft-model")) for a in off)
    values = {
        "exec": {
            "speculation": "draft",
            "numSpeculativeTokens": 3,
            "draftModel": "file:///s/d/manifest.json",
        },
        "prepareJob": {"enabled": True, "compileGraphs": True, "models": [{"source": "org/a"}]},
    }
    objs = render(values)
    args = expand_args(container(exec_deploy(objs)), configmap(objs))
    ns = parser.parse_args(args)
    shape = serving_shape_from_args(ns, parser)
    assert (shape.speculation, shape.num_speculative_tokens) == ("draft", 3)
    assert ns.draft_model == "file:///s/d/manifest.json"
    (job,) = find(objs, "Job")
    env = {e["name"]: e.get("value") for e in container(job)["env"] if "value" in e}
    compile_argv = json.loads(env["NEURON_SERVE_COMPILE_ARGV"])
    ns = parser.parse_args(["compile", "file:///s/models/a/k/manifest.json", *compile_argv])
    assert serving_shape_from_args(ns, parser) == shape


# --------------------------------------------------------------------------------------- probes


@pytest.mark.parametrize("profile", PROFILES)
def test_probes_use_native_grpc_health(profile):
    objs = render_profile(profile)
    tls = bool((profile_values(profile) or {}).get("tls", {}).get("enabled"))
    for deploy, service in ((exec_deploy(objs), EXEC_SERVICE), (prep_deploy(objs), PREP_SERVICE)):
        c = container(deploy)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        probe_port = ports["health"] if tls else ports["grpc"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c[kind]
            assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), f"{kind} is not a gRPC probe"
            assert probe["grpc"]["port"] == probe_port
        # readiness (and startup: loaded) on the service name; liveness on "" (the process).
        assert c["readinessProbe"]["grpc"]["service"] == service
        assert c["startupProbe"]["grpc"]["service"] == service
        assert c["livenessProbe"]["grpc"].get("service", "") == ""


def test_exec_startup_probe_allows_a_long_model_load():
    c = container(exec_deploy(render_profile("default")))
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 15 * 60
    assert "initialDelaySeconds" not in c["livenessProbe"]  # the startup probe gates it instead


def test_tls_mounts_secret_and_probes_plaintext_health_port():
    objs = render({"tls": {"enabled": True, "secretName": "my-tls", "clientAuth": True, "healthPort": 50099}})
    for deploy in (exec_deploy(objs), prep_deploy(objs)):
        spec = deploy["spec"]["template"]["spec"]
        c = container(deploy)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NEURON_SERVE_TLS_CERT"] == "/etc/neuron-serve/tls/tls.crt"
        assert env["NEURON_SERVE_TLS_KEY"] == "/etc/neuron-serve/tls/tls.key"
        assert env["NEURON_SERVE_TLS_CLIENT_CA"] == "/etc/neuron-serve/tls/ca.crt"
        assert env["NEURON_SERVE_HEALTH_PORT"] == "50099"
        assert {"name": "tls", "secret": {"secretName": "my-tls", "defaultMode": 0o440}} in spec["volumes"]
        assert any(m["name"] == "tls" and m["readOnly"] for m in c["volumeMounts"])
        assert c["livenessProbe"]["grpc"]["port"] == 50099
    # The prepare Job serves nothing: no TLS env there.
    job_objs = render(
        {
            "tls": {"enabled": True, "secretName": "my-tls"},
            "prepareJob": {"enabled": True, "models": [{"source": "x"}]},
        }
    )
    (job,) = find(job_objs, "Job")
    assert "NEURON_SERVE_TLS_CERT" not in {e["name"] for e in container(job)["env"]}


# ------------------------------------------------------------------------------ graceful shutdown


@pytest.mark.parametrize("profile", PROFILES)
def test_grace_period_covers_the_drain_timeout(profile):
    objs = render_profile(profile)
    cm = configmap(objs)
    for deploy in (exec_deploy(objs), prep_deploy(objs)):
        spec = deploy["spec"]["template"]["spec"]
        c = container(deploy)
        drain = float(arg_value(expand_args(c, cm), "--grace-period"))
        pre_stop = 0
        if "lifecycle" in c:
            cmd = c["lifecycle"]["preStop"]["exec"]["command"]
            assert cmd[0] == "sleep"
            pre_stop = int(cmd[1])
        assert spec["terminationGracePeriodSeconds"] >= drain + pre_stop, deploy["metadata"]["name"]


def test_explicit_grace_period_is_kept_and_prestop_can_be_disabled():
    objs = render(
        {"exec": {"drainTimeoutSeconds": 100, "preStopSleepSeconds": 0, "terminationGracePeriodSeconds": 100}}
    )
    d = exec_deploy(objs)
    assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 100
    assert "lifecycle" not in container(d)
    assert arg_value(container(d)["args"], "--grace-period") == "100"


# -------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("profile", PROFILES)
def test_pods_run_non_root_with_read_only_root(profile):
    specs = pod_specs(render_profile(profile))
    assert len(specs) >= 2
    for name, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["runAsUser"] > 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc.get("runAsNonRoot", psc["runAsNonRoot"]) is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc.get("privileged", False) is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name
            # A read-only root needs writable scratch space: /tmp and the caches are emptyDirs.
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            for path in ("/tmp", "/var/cache/neuron-serve"):
                assert "emptyDir" in volumes[mounts[path]], (name, path)


def test_caches_point_at_writable_mounts():
    cm = configmap(render_profile("default"))
    for key in (
        "HOME",
        "TMPDIR",
        "XDG_CACHE_HOME",
        "HF_HOME",
        "TORCHINDUCTOR_CACHE_DIR",
        "TORCH_NEURONX_NEFF_CACHE_DIR",
    ):
        assert cm[key].startswith(("/tmp", "/var/cache/neuron-serve")), key


# ---------------------------------------------------------------------------------- accelerators


@pytest.mark.parametrize(
    ("profile", "resource", "count", "device"),
    [
        ("default", "aws.amazon.com/neuroncore", 1, "neuron"),
        ("neuron", "aws.amazon.com/neuroncore", 2, "neuron"),
        ("gpu", "nvidia.com/gpu", 2, "cuda"),
        ("cpu", None, 0, "cpu"),
    ],
)
def test_exec_requests_the_accelerator_of_its_profile(profile, resource, count, device):
    objs = render_profile(profile)
    d = exec_deploy(objs)
    c = container(d)
    res = c["resources"]
    extended = {"aws.amazon.com/neuron", "aws.amazon.com/neuroncore", "nvidia.com/gpu"}
    if resource is None:
        assert extended.isdisjoint(res.get("requests", {})) and extended.isdisjoint(res.get("limits", {}))
    else:
        # Extended resources: requests must equal limits.
        assert int(res["requests"][resource]) == count
        assert int(res["limits"][resource]) == count
        assert extended - {resource} == extended - set(res["requests"])
        # The device plugins' node taints are tolerated.
        taint = "nvidia.com/gpu" if device == "cuda" else "aws.amazon.com/neuron"
        assert taint in {t["key"] for t in d["spec"]["template"]["spec"]["tolerations"]}
    assert arg_value(expand_args(c, configmap(objs)), "--device") == device
    assert d["metadata"]["labels"]["neuron-serve.io/profile"] == (
        "neuron" if profile == "default" else profile
    )
    # The image matches the profile.
    assert c["image"].split(":")[0].endswith({"neuron": "neuron", "cuda": "cuda", "cpu": "cpu"}[device])


def test_neuron_profile_targets_neuron_nodes():
    spec = exec_deploy(render_profile("default"))["spec"]["template"]["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    types = terms[0]["matchExpressions"][0]["values"]
    # TorchNeuron supports Trn2 and Trn3 only (no Inferentia2 / Trn1)
    assert types and all(t.startswith(("trn2.", "trn2u.", "trn3")) for t in types)
    assert {"key": "aws.amazon.com/neuron", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    cpu_spec = exec_deploy(render_profile("cpu"))["spec"]["template"]["spec"]
    assert "affinity" not in cpu_spec and "tolerations" not in cpu_spec


@pytest.mark.parametrize(
    ("tp", "resource", "cores", "expected"),
    [
        (1, "aws.amazon.com/neuron", 2, 1),
        (2, "aws.amazon.com/neuron", 2, 1),
        (3, "aws.amazon.com/neuron", 2, 2),
        (8, "aws.amazon.com/neuron", 4, 2),
        (4, "aws.amazon.com/neuroncore", 2, 4),
    ],
)
def test_neuron_accelerator_count_follows_tp(tp, resource, cores, expected):
    values = {
        "exec": {"tp": tp, "accelerators": {"neuron": {"resourceName": resource, "coresPerDevice": cores}}}
    }
    res = container(exec_deploy(render(values)))["resources"]
    assert int(res["requests"][resource]) == expected
    assert int(res["limits"][resource]) == expected


def test_neuron_profile_runs_torchneuron_one_rank_per_core():
    """The neuron profile: one NeuronCore per TP rank (exec-server starts a rank process per core),
    TorchNeuron's NEFF cache on the writable cache volume (the graph set is restored into it at
    start), NEURON_CC_FLAGS / the target from values (both part of the graph key), no legacy
    PyTorch/XLA cache settings."""
    objs = render({"exec": {"tp": 4, "accelerators": {"neuron": {"ccFlags": "--lnc 2", "target": "trn2"}}}})
    cm = configmap(objs)
    res = container(exec_deploy(objs))["resources"]
    assert (
        int(res["requests"]["aws.amazon.com/neuroncore"])
        == 4
        == int(res["limits"]["aws.amazon.com/neuroncore"])
    )
    assert cm["TORCH_NEURONX_NEFF_CACHE_DIR"] == "/var/cache/neuron-serve/neff"
    assert cm["NEURON_CC_FLAGS"] == "--lnc 2" and cm["NEURON_PLATFORM_TARGET_OVERRIDE"] == "trn2"
    default = configmap(render_profile("default"))
    assert default["NEURON_CC_FLAGS"] == "" and "NEURON_PLATFORM_TARGET_OVERRIDE" not in default
    assert not {k for k in default if k.startswith(("NEURON_COMPILE_CACHE", "XLA_"))}


def test_neuron_graph_sets_compile_only_in_the_prepare_job():
    values = {
        "exec": {"accelerators": {"neuron": {"target": "trn2"}}},
        "prepareJob": {
            "enabled": True,
            "compileGraphs": True,
            "image": {"repository": "ghcr.io/neuron-serve/neuron-serve-exec-neuron"},
            "models": [{"source": "HuggingFaceTB/SmolLM2-135M-Instruct"}],
        },
    }
    objs = render(values)
    (job,) = find(objs, "Job")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TORCH_NEURONX_COMPILE_ONLY"] == "1"
    assert json.loads(env["NEURON_SERVE_COMPILE_ARGV"])[:2] == ["--device", "neuron"]
    assert configmap(objs)["NEURON_PLATFORM_TARGET_OVERRIDE"] == "trn2"
    # exec pods never run compile-only
    exec_env = {e["name"] for e in container(exec_deploy(objs))["env"]}
    assert "TORCH_NEURONX_COMPILE_ONLY" not in exec_env and "TORCH_NEURONX_COMPILE_ONLY" not in configmap(
        objs
    )


def test_explicit_accelerator_count_and_scheduling_overrides():
    values = {
        "exec": {
            "tp": 2,
            "accelerators": {"neuron": {"count": 3}},
            "nodeSelector": {"karpenter.sh/nodepool": "inf2"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
            ],
            "affinity": {"podAntiAffinity": {}},
        }
    }
    spec = exec_deploy(render(values))["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["aws.amazon.com/neuroncore"] == 3
    assert spec["nodeSelector"] == {"karpenter.sh/nodepool": "inf2"}
    assert [t["key"] for t in spec["tolerations"]] == ["aws.amazon.com/neuron", "dedicated"]
    assert spec["affinity"] == {"podAntiAffinity": {}}


@pytest.mark.parametrize(
    ("tp", "setting", "mounted"), [(1, "auto", False), (2, "auto", True), (1, True, True), (4, False, False)]
)
def test_shared_memory_for_tensor_parallel_ranks(tp, setting, mounted):
    spec = exec_deploy(render({"exec": {"tp": tp, "sharedMemory": {"enabled": setting}}}))["spec"][
        "template"
    ]["spec"]
    shm = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert bool(shm) == mounted
    if mounted:
        (vol,) = [v for v in spec["volumes"] if v["name"] == shm[0]["name"]]
        assert vol["emptyDir"]["medium"] == "Memory"
        assert vol["emptyDir"]["sizeLimit"]


# --------------------------------------------------------------------------- serving config / args


def test_exec_args_come_from_the_serving_configmap():
    objs = render_profile("neuron")
    cm = configmap(objs)
    d = exec_deploy(objs)
    c = container(d)
    args = expand_args(c, cm)
    v = profile_values("neuron")["exec"]
    assert args[0] == "exec-server"
    assert arg_value(args, "--model") == v["model"]
    assert arg_value(args, "--host") == "0.0.0.0"
    assert arg_value(args, "--port") == "50051"
    assert arg_value(args, "--metrics-port") == "9090"
    assert arg_value(args, "--max-batch-size") == str(v["maxBatchSize"])
    assert arg_value(args, "--max-seq-len") == str(v["maxSeqLen"])
    assert arg_value(args, "--context-buckets") == ",".join(str(b) for b in v["contextBuckets"])
    assert arg_value(args, "--graphs") == "required"  # the production profile never compiles in a pod
    assert cm["NEURON_SERVE_TP"] == "2"
    assert cm["NEURON_SERVE_STORE"] == "s3://example-neuron-serve-artifacts/prod"
    assert cm["AWS_REGION"] == "us-west-2"
    assert {"configMapRef": {"name": f"{RELEASE}-neuron-serve-config"}} in c["envFrom"]
    # Every $(VAR) in the args resolves.
    assert not any("$(" in a for a in args)
    prep_args = expand_args(container(prep_deploy(objs)), cm)
    assert prep_args[0] == "prep-server"
    assert arg_value(prep_args, "--store") == cm["NEURON_SERVE_STORE"]


@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_commands_parse_with_the_real_cli(profile):
    """The chart's args are accepted by `neuron-serve`'s own argument parser (flags cannot drift)."""
    from shared.cli import build_parser

    parser = build_parser()
    objs = render_profile(profile)
    cm = configmap(objs)
    values = deep_merge(_chart().values, profile_values(profile) or {})
    e = values["exec"]

    ns = parser.parse_args(expand_args(container(exec_deploy(objs)), cm))
    assert ns.command == "exec-server"
    assert (ns.host, ns.port, ns.metrics_port) == ("0.0.0.0", 50051, 9090)
    assert ns.model == e["model"]
    assert ns.device == {"neuron": "neuron", "gpu": "cuda", "cpu": "cpu"}[e["profile"]]
    assert (ns.max_batch_size, ns.max_seq_len) == (e["maxBatchSize"], e["maxSeqLen"])
    assert ns.context_buckets == tuple(sorted(e["contextBuckets"]))
    assert ns.graphs == e["graphs"]
    assert ns.grace_period == e["drainTimeoutSeconds"]
    assert ns.max_waiting_requests == e["maxWaitingRequests"]
    assert ns.log_level == "INFO"

    ns = parser.parse_args(expand_args(container(prep_deploy(objs)), cm))
    assert ns.command == "prep-server"
    assert (ns.host, ns.port, ns.metrics_port) == ("0.0.0.0", 50051, 9090)
    assert ns.store == cm["NEURON_SERVE_STORE"]
    assert ns.grace_period == values["prep"]["drainTimeoutSeconds"]

    for job in find(objs, "Job"):
        c = container(job)
        if "args" in c:
            argvs = [c["args"]]
        else:
            argvs = json.loads(next(x["value"] for x in c["env"] if x["name"] == "NEURON_SERVE_PREPARE_ARGV"))
        for argv in argvs:
            ns = parser.parse_args(argv)
            assert ns.command == "prepare" and ns.tp >= 1 and ns.output


def test_changing_the_model_rolls_the_deployment():
    def checksum(values):
        d = exec_deploy(render(values))
        return d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    a = checksum({"exec": {"model": "s3://bucket-a/models/m/k1/manifest.json"}})
    b = checksum({"exec": {"model": "s3://bucket-a/models/m/k2/manifest.json"}})
    assert a != b
    d = exec_deploy(render_profile("default"))
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_store_defaults_to_a_file_store_on_a_mounted_volume():
    objs = render_profile("cpu")
    assert configmap(objs)["NEURON_SERVE_STORE"] == "file:///var/lib/neuron-serve/store"
    for _name, spec in pod_specs(objs):
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["store"]["persistentVolumeClaim"]["claimName"] == "neuron-serve-store"
    # An s3:// store mounts no store volume.
    for _name, spec in pod_specs(render_profile("gpu")):
        assert "store" not in {v["name"] for v in spec["volumes"]}
    assert "emptyDir per pod" in notes()


# ----------------------------------------------------------------------------- services / identity


@pytest.mark.parametrize("profile", PROFILES)
def test_services_name_the_grpc_port_with_app_protocol(profile):
    objs = render_profile(profile)
    services = find(objs, "Service")
    names = {s["metadata"]["name"] for s in services}
    assert {
        f"{RELEASE}-neuron-serve-exec",
        f"{RELEASE}-neuron-serve-prep",
        f"{RELEASE}-neuron-serve-exec-headless",
    } == names
    for s in services:
        grpc = [p for p in s["spec"]["ports"] if p["name"] == "grpc"]
        assert len(grpc) == 1
        assert grpc[0]["appProtocol"] == "grpc"
        assert grpc[0]["targetPort"] == "grpc"
        selector = s["spec"]["selector"]
        assert selector["app.kubernetes.io/instance"] == RELEASE
    headless = one(objs, "Service", f"{RELEASE}-neuron-serve-exec-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"]["app.kubernetes.io/component"] == "exec"
    # Headless clients dial pod IPs: the port must be the container port.
    assert headless["spec"]["ports"][0]["port"] == 50051


def test_http_api_port_is_off_by_default_and_complete_when_on():
    """exec.httpPort: the exec-server flag (parsed by the real CLI), a container port and a Service
    port named http, a NetworkPolicy rule, the NOTES line; https as the appProtocol with TLS on."""
    from shared.cli import build_parser

    def http_ports(objs):
        c = container(exec_deploy(objs))
        svc = one(objs, "Service", f"{RELEASE}-neuron-serve-exec")
        np_ = one(objs, "NetworkPolicy", f"{RELEASE}-neuron-serve-exec")
        return (
            [p for p in c["ports"] if p["name"] == "http"],
            [p for p in svc["spec"]["ports"] if p["name"] == "http"],
            [r for r in np_["spec"]["ingress"] if r["ports"][0]["port"] == "http"],
            [a for a in c["args"] if a.startswith("--http-port")],
        )

    assert http_ports(render_profile("default")) == ([], [], [], [])
    assert "OpenAI-compatible" not in notes()

    peers = [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    values = {"exec": {"httpPort": 8000}, "networkPolicy": {"httpFrom": peers}}
    objs = render(values)
    cport, sport, rule, args = http_ports(objs)
    assert cport == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert sport == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"}
    ]
    assert rule[0]["from"] == peers
    assert args == ["--http-port=8000"]
    ns = build_parser().parse_args(expand_args(container(exec_deploy(objs)), configmap(objs)))
    assert ns.http_port == 8000
    assert f"http://{RELEASE}-neuron-serve-exec.{NAMESPACE}.svc:8000/v1" in notes(values)
    # the prep Service and the headless gRPC Service stay gRPC-only
    assert all(
        p["name"] != "http" for p in one(objs, "Service", f"{RELEASE}-neuron-serve-prep")["spec"]["ports"]
    )
    for o in objs:
        if o["kind"] not in CRD_KINDS:
            kv.validate(o, K8S_VERSIONS[-1], strict=True)

    tls = {"exec": {"httpPort": 8443}, "tls": {"enabled": True, "secretName": "certs"}}
    _, sport, _, _ = http_ports(render(tls))
    assert sport[0]["appProtocol"] == "https" and "https://" in notes(tls)


def test_headless_service_can_be_turned_off():
    objs = render({"exec": {"service": {"headless": {"enabled": False}}}})
    assert not find(objs, "Service", f"{RELEASE}-neuron-serve-exec-headless")


def test_service_account_has_irsa_annotation():
    objs = render_profile("neuron")
    sa = one(objs, "ServiceAccount", f"{RELEASE}-neuron-serve")
    assert (
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        == "arn:aws:iam::123456789012:role/neuron-serve-s3"
    )
    for _name, spec in pod_specs(objs):
        assert spec["serviceAccountName"] == f"{RELEASE}-neuron-serve"
    assert (
        "annotations"
        not in one(render_profile("default"), "ServiceAccount", f"{RELEASE}-neuron-serve")["metadata"]
    )


def test_hf_token_comes_from_a_secret_reference():
    objs = render_profile("neuron")
    for name, spec in pod_specs(objs):
        env = {e["name"]: e for e in spec["containers"][0]["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}, name
        assert "value" not in env["HF_TOKEN"]
    for _name, spec in pod_specs(render_profile("default")):
        assert "HF_TOKEN" not in {e["name"] for e in spec["containers"][0]["env"]}
    # No Secret objects are created by the chart: only references.
    assert not find(objs, "Secret")


# ------------------------------------------------------------------------- availability / scaling


def test_pod_disruption_budgets():
    objs = render_profile("default")
    for comp in ("exec", "prep"):
        pdb = one(objs, "PodDisruptionBudget", f"{RELEASE}-neuron-serve-{comp}")
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == comp
    objs = render({"exec": {"pdb": {"minAvailable": "50%"}}, "prep": {"pdb": {"enabled": False}}})
    pdb = one(objs, "PodDisruptionBudget", f"{RELEASE}-neuron-serve-exec")
    assert pdb["spec"]["minAvailable"] == "50%" and "maxUnavailable" not in pdb["spec"]
    assert not find(objs, "PodDisruptionBudget", f"{RELEASE}-neuron-serve-prep")


def test_hpa_is_optional_and_owns_the_replica_count():
    assert not find(render_profile("default"), "HorizontalPodAutoscaler")
    objs = render_profile("neuron")
    hpa = one(objs, "HorizontalPodAutoscaler", f"{RELEASE}-neuron-serve-exec")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{RELEASE}-neuron-serve-exec",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert "replicas" not in exec_deploy(objs)["spec"]
    custom = [
        {
            "type": "Pods",
            "pods": {"metric": {"name": "q"}, "target": {"type": "AverageValue", "averageValue": "4"}},
        }
    ]
    hpa = one(
        render({"exec": {"autoscaling": {"enabled": True, "metrics": custom}}}),
        "HorizontalPodAutoscaler",
        f"{RELEASE}-neuron-serve-exec",
    )
    assert hpa["spec"]["metrics"] == custom


def test_network_policies():
    objs = render_profile("default")
    for comp in ("exec", "prep"):
        np_ = one(objs, "NetworkPolicy", f"{RELEASE}-neuron-serve-{comp}")
        assert np_["spec"]["policyTypes"] == ["Ingress"]
        ports = [r["ports"][0]["port"] for r in np_["spec"]["ingress"]]
        assert ports == ["grpc", "metrics"]
    objs = render_profile("neuron")  # egress restricted, TLS health port
    np_ = one(objs, "NetworkPolicy", f"{RELEASE}-neuron-serve-exec")
    assert "Egress" in np_["spec"]["policyTypes"]
    egress_ports = {(p["port"], p["protocol"]) for r in np_["spec"]["egress"] for p in r.get("ports", [])}
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= egress_ports
    assert "health" in [r["ports"][0]["port"] for r in np_["spec"]["ingress"]]
    assert not find(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


# --------------------------------------------------------------------------------- prepare Job


def test_no_job_by_default():
    assert not find(render_profile("default"), "Job")


def test_single_model_job_calls_neuron_serve_prepare():
    objs = render_profile("gpu")
    (job,) = find(objs, "Job")
    spec = job["spec"]
    assert "completionMode" not in spec and spec["completions"] == 1
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    c = container(job)
    assert "command" not in c  # the image's entrypoint is `neuron-serve`
    args = c["args"]
    assert args[:2] == ["prepare", "Qwen/Qwen2.5-7B-Instruct"]
    assert arg_value(args, "--tp") == "2"
    assert arg_value(args, "--dtype") == "bfloat16"
    assert arg_value(args, "--output") == "s3://example-neuron-serve-artifacts/prod"
    assert c["image"].startswith("ghcr.io/neuron-serve/neuron-serve-prep:")


def test_several_models_make_an_indexed_job():
    objs = render_profile("cpu")
    (job,) = find(objs, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == 2 and spec["parallelism"] == 2
    c = container(job)
    env = {e["name"]: e.get("value") for e in c["env"]}
    argvs = json.loads(env["NEURON_SERVE_PREPARE_ARGV"])
    assert [a[:2] for a in argvs] == [
        ["prepare", "HuggingFaceTB/SmolLM2-135M-Instruct"],
        ["prepare", "Qwen/Qwen2.5-0.5B-Instruct"],
    ]
    assert arg_value(argvs[0], "--name") == "smollm2-135m-instruct"
    assert arg_value(argvs[1], "--revision") == "main"
    assert arg_value(argvs[0], "--tp") == "1"  # defaults to exec.tp
    # The launcher picks the argv by JOB_COMPLETION_INDEX and execs `neuron-serve`.
    assert c["command"][:2] == ["python", "-c"]
    assert "JOB_COMPLETION_INDEX" in c["command"][2] and "execvp" in c["command"][2]


def test_prepare_job_quantizes_when_asked():
    def args(model):
        (job,) = find(render({"prepareJob": {"enabled": True, "models": [model]}}), "Job")
        return container(job)["args"]

    assert "--quantize" not in args({"source": "org/a"})
    a = args({"source": "org/a", "quantize": "int8", "quantizeLmHead": True})
    assert arg_value(a, "--quantize") == "int8" and "--quantize-lm-head" in a
    from shared.cli import build_parser

    ns = build_parser().parse_args(a)
    assert ns.quantize == "int8" and ns.quantize_lm_head


def test_job_name_changes_with_its_inputs():
    def job_name(models):
        (job,) = find(render({"prepareJob": {"enabled": True, "models": models}}), "Job")
        return job["metadata"]["name"]

    a = job_name([{"source": "org/a"}])
    assert a == job_name([{"source": "org/a"}])
    assert a != job_name([{"source": "org/b"}])
    assert a != job_name([{"source": "org/a", "dtype": "bfloat16"}])
    assert re.fullmatch(rf"{RELEASE}-neuron-serve-prepare-[0-9a-f]{{8}}", a)


def test_long_release_names_fit():
    out = _chart().render(values=profile_values("neuron"), name="a" * 53, namespace=NAMESPACE)
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for o in yaml.safe_load_all(text):
            if o:
                assert len(o["metadata"]["name"]) <= 63, o["metadata"]["name"]


def test_service_monitor_is_optional():
    assert not find(render_profile("default"), "ServiceMonitor")
    sms = find(render_profile("neuron"), "ServiceMonitor")
    assert {s["spec"]["endpoints"][0]["port"] for s in sms} == {"http-metrics"}
    assert len(sms) == 2


# --------------------------------------------------------------------------- docs and Dockerfiles


def test_operations_doc_says_no_cluster_runs_in_ci():
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert "No Kubernetes cluster runs in CI" in text
    assert "no container engine" in text.lower()
    for section in (
        "Deploy",
        "Prepare a model",
        "Roll out a new artifact",
        "Scal",
        "Metrics",
        "TLS",
        "Troubleshooting",
    ):
        assert re.search(rf"^#+ .*{section}", text, re.M), section


@pytest.mark.parametrize("name", ["Dockerfile.prep", "Dockerfile.exec-cpu", "Dockerfile.exec-neuron"])
def test_dockerfiles_build_non_root_images(name):
    text = (ROOT / "docker" / name).read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), "the final stage runs as a non-root user"
    assert re.search(r'^ENTRYPOINT \["neuron-serve"\]', text, re.M)
    # The chart's pod security context runs uid 10001: the image's user must match.
    assert users[-1].split(":")[0] == "10001"


def test_dockerignore_keeps_the_context_small():
    entries = (ROOT / ".dockerignore").read_text().split()
    for e in (".git", ".venv", "tests", "bench"):
        assert any(x.strip("/*") == e for x in entries), e


def test_prepare_job_compiles_the_exec_graph_set_when_asked(tmp_path):
    """compileGraphs: the launcher runs `neuron-serve prepare`, then `neuron-serve compile` of the
    manifest URI it printed, with the exec Deployment's device and serving shape (run here with a
    stand-in `neuron-serve` that records its argv); the argv parses with the real CLI."""
    values = {
        "prepareJob": {"enabled": True, "compileGraphs": True, "models": [{"source": "org/a"}]},
        "exec": {"maxBatchSize": 4, "maxSeqLen": 1024, "contextBuckets": [128, 512], "batchBuckets": [1, 4]},
    }
    (job,) = find(render(values), "Job")
    c = container(job)
    env = {e["name"]: e.get("value") for e in c["env"] if "value" in e}
    compile_argv = json.loads(env["NEURON_SERVE_COMPILE_ARGV"])
    assert arg_value(compile_argv, "--max-batch-size") == "4"
    assert arg_value(compile_argv, "--context-buckets") == "128,512"
    assert arg_value(compile_argv, "--batch-buckets") == "1,4"
    from shared.cli import build_parser

    ns = build_parser().parse_args(["compile", "file:///s/models/a/k/manifest.json", *compile_argv])
    assert (ns.command, ns.max_seq_len, ns.context_buckets) == ("compile", 1024, (128, 512))

    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "bin" / "neuron-serve"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1] == 'prepare':\n    print('converting...')\n    print('file:///s/models/a/k/manifest.json')\n"
    )
    fake.chmod(0o755)
    run_env = {**os.environ, **env, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    assert c["command"][:2] == ["python", "-c"]
    subprocess.run([sys.executable, "-c", c["command"][2]], env=run_env, check=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0][:2] == ["prepare", "org/a"]
    assert calls[1] == ["compile", "file:///s/models/a/k/manifest.json", *compile_argv]
