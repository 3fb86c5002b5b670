"""The deploy folder: the container image (deploy/Dockerfile) and the kustomize tree (deploy/k8s).

No cluster or Docker engine runs here, so these tests check what can be checked without one:
every overlay renders with the pinned kubectl (kustomize built in), every rendered object is valid
for the pinned Kubernetes API schemas, and the policies the deployment promises hold on the
rendered objects of every overlay. The image is checked by parsing the Dockerfile and by running its
two scripts with stand-ins for `vllm` and `glowq-calibrate`.

kubectl comes from scripts/install-deploy-tools.sh (which scripts/install.sh runs); without it
these tests fail rather than skip, so CI cannot pass without rendering.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS_DIR = K8S / "overlays"
SERVE_ARGS = DEPLOY / "serve-args.txt"
SERVE_ARGS_REAL = K8S / "base" / "serve-args.txt"
DOCKERFILE = DEPLOY / "Dockerfile"
INSTALL_TOOLS = REPO / "scripts" / "install-deploy-tools.sh"

# Kubernetes API versions whose schemas (bundled in the pinned kubernetes-validate) every rendered
# object must satisfy: the oldest release the manifests claim to support and the newest bundled.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
# Kinds defined by CRDs, which have no schema in kubernetes-validate; checked field by field below.
CRD_KINDS = {"ServiceMonitor"}

OVERLAYS = sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------- helpers

def pinned(name: str) -> str:
    """A version pinned in scripts/install-deploy-tools.sh (the one place it is written)."""
    m = re.search(rf"^{name}=(\S+)$", INSTALL_TOOLS.read_text(), re.M)
    assert m, f"{name} not pinned in {INSTALL_TOOLS}"
    return m.group(1)


def kubectl() -> str:
    """The pinned kubectl installed into this Python environment (or the repo's .venv)."""
    for candidate in (Path(sys.executable).parent / "kubectl", REPO / ".venv" / "bin" / "kubectl"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("kubectl is missing: run `bash scripts/install-deploy-tools.sh` (scripts/install.sh does)")


def render(path: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def serve_args_tokens(text: str) -> list[str]:
    """serve-args.txt as tokens: one a line, blank lines and `#` lines skipped (as glowq-serve reads it)."""
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def by_prefix(objs: list[dict], kind: str, prefix: str) -> dict:
    """A generated object (ConfigMap names get a content-hash suffix)."""
    found = [o for o in objs if o["kind"] == kind and re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {prefix}-<hash>, found {len(found)}"
    return found[0]


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
            for o in objs if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec["containers"] if c["name"] == name)


def server(objs: list[dict]) -> dict:
    return one(objs, "Deployment", "glowq-server")


def server_container(objs: list[dict]) -> dict:
    return container(server(objs)["spec"]["template"]["spec"], "vllm")


def job(objs: list[dict]) -> dict:
    return one(objs, "Job", "glowq-calibrate")


def env_value(objs: list[dict], c: dict, name: str) -> str:
    """A container variable's value, from `env` or from a ConfigMap in `envFrom`."""
    for e in c.get("env", []):
        if e["name"] == name and "value" in e:
            return e["value"]
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            data = one(objs, "ConfigMap", src["configMapRef"]["name"]).get("data", {})
            if name in data:
                return data[name]
    raise AssertionError(f"container {c['name']} has no value for {name}")


def quantity(q) -> float:
    """A Kubernetes quantity (cpu or bytes) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m and (m.group(2) == "" or m.group(2) in units), f"unexpected quantity {q!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def resolve_port(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p.get("name") == port)


def served_port() -> int:
    tokens = serve_args_tokens(SERVE_ARGS.read_text())
    return int(tokens[tokens.index("--port") + 1])


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not buf and (raw.lstrip().startswith("#") or not raw.strip()):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        instr, _, rest = buf.strip().partition(" ")
        lines.append((instr.upper(), rest.strip()))
        buf = ""
    return lines


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(OVERLAYS_DIR / name) for name in OVERLAYS}


# ---------------------------------------------------------------- tools and rendering

def test_pinned_kubectl_is_used():
    out = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True, timeout=30)
    assert f"Client Version: v{pinned('KUBECTL_VERSION')}" in out.stdout


def test_pinned_kubernetes_validate():
    from importlib.metadata import version

    assert version("kubernetes-validate") == pinned("KUBERNETES_VALIDATE_VERSION")


def test_install_script_runs_deploy_tools_last():
    lines = (REPO / "scripts" / "install.sh").read_text().splitlines()
    steps = [s.strip() for s in lines if s.strip().startswith(("run ", "pip_install "))]
    assert steps[-1] == "run bash scripts/install-deploy-tools.sh"


def test_overlays_exist():
    assert {"gpu", "cpu", "gpu-autoscaling"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_object(rendered, overlay):
    objs = rendered[overlay]
    for kind, name in [("Namespace", "glowq"), ("PersistentVolumeClaim", "glowq-models"), ("Job", "glowq-calibrate"),
                       ("Deployment", "glowq-server"), ("Service", "glowq"), ("PodDisruptionBudget", "glowq-server")]:
        one(objs, kind, name)
    for prefix in ("glowq-serve-args", "glowq-calibration", "glowq-serving"):
        by_prefix(objs, "ConfigMap", prefix)
    # No Secret is rendered: the API key and the HF token never live in the repository.
    assert not [o for o in objs if o["kind"] == "Secret"]
    namespaced = [o for o in objs if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"glowq"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_kubernetes_schemas(rendered, overlay, version):
    import kubernetes_validate

    for obj in rendered[overlay]:
        if obj["kind"] in CRD_KINDS:
            continue
        # strict: unknown fields (a typo such as `readOnlyRootFileSystem`) fail too.
        kubernetes_validate.validate(obj, version, strict=True)


def test_schema_validation_catches_a_typo():
    """Guards the test above: a misspelt field must not pass as valid."""
    import kubernetes_validate

    obj = render(OVERLAYS_DIR / "cpu")
    dep = server(obj)
    dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBERNETES_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- policies on every overlay

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_restricted(rendered, overlay):
    """Pod Security Standard `restricted`, plus a read-only root filesystem and no service-account token."""
    objs = rendered[overlay]
    ns = one(objs, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for where, spec in pod_specs(objs):
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True, where
        assert sc["runAsUser"] != 0 and sc["runAsGroup"] != 0, where
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), where
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], where
        for c in all_containers(spec):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert csc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert csc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert not csc["capabilities"].get("add"), (where, c["name"])
            assert not csc.get("privileged"), (where, c["name"])
            assert csc.get("runAsUser", sc["runAsUser"]) != 0, (where, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_are_bounded(rendered, overlay):
    objs = rendered[overlay]
    for where, spec in pod_specs(objs):
        for c in all_containers(spec):
            req, lim = c["resources"]["requests"], c["resources"]["limits"]
            for res in ("cpu", "memory"):
                assert res in req and res in lim, (where, c["name"], res)
                assert quantity(req[res]) <= quantity(lim[res]), (where, c["name"], res)
            if GPU in req or GPU in lim:
                # Extended resources cannot be overcommitted: request and limit must agree.
                assert str(req[GPU]) == str(lim[GPU]), (where, c["name"])
            if "image" in c:
                assert re.search(r":[\w.-]+$", c["image"]) and not c["image"].endswith(":latest"), c["image"]
        mem_limit = max(quantity(c["resources"]["limits"]["memory"]) for c in spec["containers"])
        for v in spec["volumes"]:
            if "emptyDir" in v:
                assert "sizeLimit" in v["emptyDir"], (where, v["name"])
                if v["emptyDir"].get("medium") == "Memory":
                    # A memory-backed emptyDir is charged to the pod's memory: it must leave room.
                    assert quantity(v["emptyDir"]["sizeLimit"]) < mem_limit, (where, v["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shared_memory_is_a_sized_memory_volume(rendered, overlay):
    for where, spec in pod_specs(rendered[overlay]):
        main = spec["containers"][0]
        shm = [m for m in main["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1, where
        vol = next(v for v in spec["volumes"] if v["name"] == shm[0]["name"])
        assert vol["emptyDir"]["medium"] == "Memory", where
        # Above the container runtime's 64 MiB default, which is too small for PyTorch.
        assert quantity(vol["emptyDir"]["sizeLimit"]) >= 2**30, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_at_the_served_port(rendered, overlay):
    objs = rendered[overlay]
    c = server_container(objs)
    port = served_port()
    assert resolve_port(c, "http") == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert resolve_port(c, get["port"]) == port, probe
    # The start-up probe must allow for loading and compiling a model: at least 10 minutes.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    svc = one(objs, "Service", "glowq")
    pod_labels = server(objs)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (sport,) = svc["spec"]["ports"]
    assert resolve_port(c, sport["targetPort"]) == port
    assert server(objs)["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_key_comes_from_the_secret(rendered, overlay):
    objs = rendered[overlay]
    c = server_container(objs)
    (key_env,) = [e for e in c["env"] if e["name"] == "VLLM_API_KEY"]
    ref = key_env["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("glowq-api-key", "api-key")
    assert not ref.get("optional"), "the server must not start without its API key"
    args = c["args"]
    assert args[args.index("--api-key") + 1] == "$(VLLM_API_KEY)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_and_server_share_the_models_volume(rendered, overlay):
    objs = rendered[overlay]
    claim = one(objs, "PersistentVolumeClaim", "glowq-models")["metadata"]["name"]
    dep_spec, job_spec = server(objs)["spec"]["template"]["spec"], job(objs)["spec"]["template"]["spec"]

    def mount(spec: dict, c: dict) -> tuple[dict, dict]:
        (vol,) = [v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        (m,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
        return vol, m

    jc, sc = container(job_spec, "calibrate"), container(dep_spec, "vllm")
    jvol, jmount = mount(job_spec, jc)
    svol, smount = mount(dep_spec, sc)
    assert not jmount.get("readOnly") and not jvol["persistentVolumeClaim"].get("readOnly")
    assert smount["readOnly"] is True and svol["persistentVolumeClaim"]["readOnly"] is True
    # The checkpoint path is the same value for both (one ConfigMap), inside the shared volume.
    ckpt = env_value(objs, jc, "GLOWQ_CHECKPOINT")
    assert env_value(objs, sc, "GLOWQ_CHECKPOINT") == ckpt
    assert ckpt.startswith(jmount["mountPath"].rstrip("/") + "/") and jmount["mountPath"] == smount["mountPath"]
    assert sc["args"][0] == "$(GLOWQ_CHECKPOINT)"
    # The server waits for the Job's result instead of crash-looping.
    (wait,) = dep_spec["initContainers"]
    assert "$GLOWQ_CHECKPOINT/config.json" in " ".join(wait["command"])
    assert env_value(objs, wait, "GLOWQ_CHECKPOINT") == ckpt


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_paths_are_emptydirs(rendered, overlay):
    """Every cache the image points at lies on a writable emptyDir (the root filesystem is read-only)."""
    env = dict(kv.split("=", 1) for instr, rest in dockerfile() if instr == "ENV" for kv in shlex.split(rest))
    cache_vars = ["HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT",
                  "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"]
    objs = rendered[overlay]
    for where, spec in pod_specs(objs):
        empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        main = spec["containers"][0]
        writable = [m["mountPath"] for m in main["volumeMounts"] if m["name"] in empty and not m.get("readOnly")]
        overrides = {e["name"]: e.get("value") for e in main.get("env", [])}
        assert "/tmp" in writable, where
        for var in cache_vars:
            path = overrides.get(var) or env[var]
            on_empty = any(path == w or path.startswith(w + "/") for w in writable)
            # The Job may keep its Hugging Face downloads on the (writable) models volume instead.
            on_models = main["name"] == "calibrate" and var == "HF_HOME" and path.startswith("/models/")
            assert on_empty or on_models, (where, var, path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdb_covers_the_servers(rendered, overlay):
    objs = rendered[overlay]
    pdb = one(objs, "PodDisruptionBudget", "glowq-server")
    labels = server(objs)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_namespace_reaches_the_unauthenticated_endpoints(rendered, overlay):
    """vLLM's API key covers /v1 only; /metrics, /tokenize, /version ... are open, so the server
    pods admit pods of their own namespace (and, with autoscaling, Prometheus's) and nothing else."""
    objs = rendered[overlay]
    labels = server(objs)["spec"]["template"]["metadata"]["labels"]
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    assert set(policies) == ({"glowq-server", "glowq-metrics"} if "autoscaling" in overlay else {"glowq-server"})
    for spec in policies.values():
        assert spec["podSelector"]["matchLabels"].items() <= labels.items()
        assert spec["policyTypes"] == ["Ingress"]
        (rule,) = spec["ingress"]
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert policies["glowq-server"]["ingress"][0]["from"] == [{"podSelector": {}}]
    assert "--disable-fastapi-docs" in serve_args_tokens(SERVE_ARGS.read_text())


# ---------------------------------------------------------------- one list of serve arguments

def test_serve_args_file_is_one_file():
    assert SERVE_ARGS.resolve() == SERVE_ARGS_REAL.resolve()
    tokens = serve_args_tokens(SERVE_ARGS.read_text())
    assert tokens[:2] == ["--quantization", "glowq"] and "--port" in tokens
    # Plain tokens only, so that every reader (glowq-serve, the e2e test) splits the file alike.
    assert all(not re.search(r"\s|#", t) for t in tokens), tokens


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_takes_serve_args_from_the_file(rendered, overlay):
    objs = rendered[overlay]
    cm = by_prefix(objs, "ConfigMap", "glowq-serve-args")
    assert cm["data"] == {"serve-args.txt": SERVE_ARGS.read_text()}
    spec = server(objs)["spec"]["template"]["spec"]
    c = container(spec, "vllm")
    assert "command" not in c, "the image's entrypoint (glowq-serve) must run, not a command written here"
    (vol,) = [v for v in spec["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    (m,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert m["mountPath"] == "/etc/glowq"
    assert "GLOWQ_SERVE_ARGS_FILE" not in {e["name"] for e in c.get("env", [])}
    # None of the file's flags is repeated in the Deployment.
    file_flags = {t for t in serve_args_tokens(SERVE_ARGS.read_text()) if t.startswith("--")}
    assert not file_flags & set(c["args"])


def test_dockerfile_bakes_the_same_file_and_runs_glowq_serve():
    instrs = dockerfile()
    copies = [shlex.split(rest) for instr, rest in instrs if instr == "COPY"]
    to_etc = [c for c in copies if c[-1] == "/etc/glowq/serve-args.txt"]
    assert len(to_etc) == 1 and (REPO / to_etc[0][-2]).resolve() == SERVE_ARGS.resolve()
    entry = [rest for instr, rest in instrs if instr == "ENTRYPOINT"]
    assert entry == ['["/usr/local/bin/glowq-serve"]']
    script = (DEPLOY / "bin" / "glowq-serve").read_text()
    assert "/etc/glowq/serve-args.txt" in script
    assert any("deploy/bin/glowq-serve" in c and c[-1] == "/usr/local/bin/" for c in copies)


def run_glowq_serve(tmp_path: Path, args_file: Path, *argv: str) -> list[str]:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "vllm").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (stub / "vllm").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "GLOWQ_SERVE_ARGS_FILE": str(args_file)}
    out = subprocess.run([str(DEPLOY / "bin" / "glowq-serve"), *argv], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_glowq_serve_runs_vllm_serve_with_the_file(tmp_path):
    argv = run_glowq_serve(tmp_path, SERVE_ARGS, "/models/x", "--api-key", "k e y")
    assert argv == ["serve", "/models/x", *serve_args_tokens(SERVE_ARGS.read_text()), "--api-key", "k e y"]


def test_glowq_serve_reads_comments_blanks_and_crlf(tmp_path):
    f = tmp_path / "args.txt"
    f.write_bytes(b"# c\r\n\r\n  --dtype \r\nbfloat16\r\n   # indented comment\n--max-model-len\n4096")
    assert run_glowq_serve(tmp_path, f, "/m") == ["serve", "/m", "--dtype", "bfloat16", "--max-model-len", "4096"]


def test_glowq_serve_extra_flags_replace_the_files(tmp_path):
    """vLLM warns "Found duplicate keys --port" when a flag comes twice; the quick start and the
    e2e test give their own port, so the file's --port and its value must give way."""
    f = tmp_path / "args.txt"
    f.write_text("--quantization\nglowq\n--port\n8000\n--enforce-eager\n--max-model-len=4096\n")
    argv = run_glowq_serve(tmp_path, f, "/m", "--port", "8765", "--max-model-len=512", "--enforce-eager")
    assert argv == ["serve", "/m", "--quantization", "glowq", "--port", "8765", "--max-model-len=512",
                    "--enforce-eager"]


def test_glowq_serve_fails_without_the_file(tmp_path):
    out = subprocess.run([str(DEPLOY / "bin" / "glowq-serve")], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "GLOWQ_SERVE_ARGS_FILE": str(tmp_path / "missing")})
    assert out.returncode == 2 and "cannot read" in out.stderr


# ---------------------------------------------------------------- the image

def test_dockerfile_policies(rendered):
    instrs = dockerfile()
    args = {k: v for instr, rest in instrs if instr == "ARG" for k, _, v in [rest.partition("=")]}
    froms = [rest for instr, rest in instrs if instr == "FROM"]
    assert froms == ["${VLLM_IMAGE}"]
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+)\.(\d+)\.(\d+)", args["VLLM_IMAGE"])
    assert m, f"base image not pinned to a vllm/vllm-openai release: {args['VLLM_IMAGE']}"
    # Inside the vLLM range the plugin supports (read without importing torch).
    compat = ast.parse((REPO / "vllm_glowq" / "compat.py").read_text())
    consts = {t.id: ast.literal_eval(n.value) for n in compat.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name) and t.id in ("MIN_VLLM", "MAX_VLLM_EXCLUSIVE")}
    assert consts["MIN_VLLM"] <= (int(m.group(1)), int(m.group(2))) < consts["MAX_VLLM_EXCLUSIVE"]
    (user,) = [rest for instr, rest in instrs if instr == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    # The manifests run as the image's user.
    for overlay in OVERLAYS:
        for _, spec in pod_specs(rendered[overlay]):
            assert spec["securityContext"]["runAsUser"] == int(uid)
    # USER comes after every RUN (nothing later runs as root), ENTRYPOINT after USER.
    order = [instr for instr, _ in instrs]
    assert max(i for i, x in enumerate(order) if x == "RUN") < order.index("USER") < order.index("ENTRYPOINT")
    pip = [rest for instr, rest in instrs if instr == "RUN" and "pip install" in rest]
    assert len(pip) == 1 and "--no-deps" in pip[0], "vLLM, torch and transformers come from the base image"
    assert "vllm.general_plugins" in pip[0], "the build checks that the plugin's entry point is registered"


def test_dockerfile_copies_exist_and_pass_the_dockerignore():
    ignore = [s.strip() for s in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if s.strip() and not s.startswith("#")]

    def kept(path: str) -> bool:
        # Docker's rule: a line matches a path or any of its parent folders; the last match wins.
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        keep = True
        for pat in ignore:
            neg = pat.startswith("!")
            body = pat[1:] if neg else pat
            rx = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
            if any(re.fullmatch(rx, p) for p in prefixes):
                keep = neg
        return keep

    assert kept("vllm_glowq/format.py") and not kept("vllm_glowq/__pycache__/x.pyc") and not kept(".venv/bin/python")
    for instr, rest in dockerfile():
        if instr != "COPY":
            continue
        for src in [t for t in shlex.split(rest) if not t.startswith("--")][:-1]:
            # README.md is the package's readme (pyproject.toml), written with the main docs.
            assert (REPO / src).exists() or src == "README.md", src
            assert kept(src), f"{src} is excluded by deploy/Dockerfile.dockerignore"


def test_image_scripts_are_executable():
    for name in ("glowq-serve", "glowq-calibrate-job"):
        path = DEPLOY / "bin" / name
        assert os.access(path, os.X_OK), path
        assert subprocess.run(["bash", "-n", str(path)], timeout=30).returncode == 0


# ---------------------------------------------------------------- calibration Job

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_calibration_job(rendered, overlay):
    objs = rendered[overlay]
    j = job(objs)
    spec = j["spec"]["template"]["spec"]
    c = container(spec, "calibrate")
    assert c["command"] == ["/usr/local/bin/glowq-calibrate-job"]
    assert spec["restartPolicy"] == "Never"
    (hf,) = [e for e in c["env"] if e["name"] == "HF_TOKEN"]
    assert hf["valueFrom"]["secretKeyRef"]["optional"] is True
    # The flags the overlay passes are ones glowq-calibrate accepts.
    from offline_calibrate.cli import calibrate_parser

    extra = env_value(objs, c, "GLOWQ_CALIBRATE_ARGS").split()
    calibrate_parser().parse_args([env_value(objs, c, "GLOWQ_SOURCE_MODEL"), "--output", "/x", *extra])
    assert env_value(objs, c, "GLOWQ_RECALIBRATE") == "false"


def run_job_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    (stub / "glowq-calibrate").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {log}\n')
    (stub / "glowq-calibrate").chmod(0o755)
    full = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", **env}
    return subprocess.run([str(DEPLOY / "bin" / "glowq-calibrate-job")], env=full, capture_output=True, text=True,
                          timeout=30)


def test_job_script_calibrates_once_then_keeps_the_checkpoint(tmp_path):
    ckpt = tmp_path / "models" / "ckpt"
    base = {"GLOWQ_SOURCE_MODEL": "org/model", "GLOWQ_CHECKPOINT": str(ckpt), "GLOWQ_CALIBRATE_ARGS": "--rank 8  --samples 4"}
    out = run_job_script(tmp_path, **base)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "calls").read_text().split("\n")[:-1] == ["org/model", "--output", str(ckpt), "--rank", "8",
                                                                  "--samples", "4"]
    (tmp_path / "calls").unlink()
    ckpt.mkdir(parents=True)
    out = run_job_script(tmp_path, **base, GLOWQ_RECALIBRATE="false")
    assert out.returncode == 0 and "keeping it" in out.stdout
    assert not (tmp_path / "calls").exists()
    out = run_job_script(tmp_path, **base, GLOWQ_RECALIBRATE="true")
    assert out.returncode == 0
    assert (tmp_path / "calls").read_text().split("\n")[-2] == "--overwrite"


def test_job_script_needs_its_settings(tmp_path):
    out = run_job_script(tmp_path, GLOWQ_CHECKPOINT=str(tmp_path / "c"))
    assert out.returncode != 0 and "GLOWQ_SOURCE_MODEL" in out.stderr


# ---------------------------------------------------------------- GPUs and tensor parallelism

def gpu_overlays() -> list[str]:
    return [o for o in OVERLAYS if o.startswith("gpu")]


@pytest.mark.parametrize("overlay", gpu_overlays())
def test_gpu_count_equals_tensor_parallel_size(rendered, overlay):
    objs = rendered[overlay]
    c = server_container(objs)
    tp = env_value(objs, c, "GLOWQ_TENSOR_PARALLEL_SIZE")
    assert int(tp) >= 1
    assert str(c["resources"]["requests"][GPU]) == tp == str(c["resources"]["limits"][GPU])
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "$(GLOWQ_TENSOR_PARALLEL_SIZE)"
    jc = container(job(objs)["spec"]["template"]["spec"], "calibrate")
    assert str(jc["resources"]["limits"][GPU]) == "1"


def test_cpu_overlay_asks_for_no_gpu(rendered):
    objs = rendered["cpu"]
    for _, spec in pod_specs(objs):
        for c in all_containers(spec):
            assert GPU not in c["resources"]["requests"] and GPU not in c["resources"]["limits"]
    c = server_container(objs)
    assert env_value(objs, c, "GLOWQ_TENSOR_PARALLEL_SIZE") == "1"
    assert c["image"].endswith("-cpu")


def test_tensor_parallel_size_is_one_parameter(tmp_path):
    """Changing the overlay's one literal changes both `--tensor-parallel-size` and the GPU count."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kfile = copy / "overlays" / "gpu" / "kustomization.yaml"
    text = kfile.read_text()
    assert text.count("GLOWQ_TENSOR_PARALLEL_SIZE=1") == 1
    kfile.write_text(text.replace("GLOWQ_TENSOR_PARALLEL_SIZE=1", "GLOWQ_TENSOR_PARALLEL_SIZE=4"))
    for overlay in ("gpu", "gpu-autoscaling"):
        objs = render(copy / "overlays" / overlay)
        c = server_container(objs)
        assert env_value(objs, c, "GLOWQ_TENSOR_PARALLEL_SIZE") == "4"
        assert str(c["resources"]["limits"][GPU]) == "4" == str(c["resources"]["requests"][GPU])


# ---------------------------------------------------------------- autoscaling

def test_autoscaling_overlay(rendered):
    objs = rendered["gpu-autoscaling"]
    dep = server(objs)
    hpa = one(objs, "HorizontalPodAutoscaler", "glowq-server")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert "replicas" not in dep["spec"], "the autoscaler owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load((K8S / "components" / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    published = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in published
    assert all(r["seriesQuery"].startswith("vllm:") for r in adapter["rules"]["custom"])
    pvc = one(objs, "PersistentVolumeClaim", "glowq-models")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "replicas on several nodes share the checkpoint"

    sm = one(objs, "ServiceMonitor", "glowq")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = one(objs, "Service", "glowq")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["path"] == "/metrics" and ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert set(sm["spec"]) == {"selector", "endpoints"} and set(ep) == {"port", "path", "interval"}


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_plain_overlays_have_one_replica_and_no_autoscaler(rendered, overlay):
    objs = rendered[overlay]
    assert server(objs)["spec"]["replicas"] == 1
    assert server(objs)["spec"]["strategy"]["type"] == "Recreate"
    assert not [o for o in objs if o["kind"] in ("HorizontalPodAutoscaler", "ServiceMonitor")]
