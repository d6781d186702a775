"""The deployment file: one YAML file describing a deployment, the same objects as DeploymentSpec.

    ziggurat serve --config deploy.yaml [--port 9000 ...]     # flags override the file
    ziggurat config example > deploy.yaml                     # a commented example
    spec = DeploymentSpec.from_file("deploy.yaml", port=9000)  # from a driver

Layout: the engine's settings under `engine:` (EngineConfig fields), the HTTP
front door's under `ingress:` (IngressConfig), the supervisor's under
`health:` (HealthConfig), replica pools as a list under `pools:` (PoolSpec
fields), and the deployment's own settings (ingresses, db, max_waiting,
pd_min_prompt_tokens, gpus_per_worker, ...) at the top, with `model:` as a
shortcut for engine.model and `address:` for the Ray cluster to join.
Secrets are never in the file: `api_keys_file:` / `admin_key_file:` name
files that hold them.

Every error names the file, the line and the field:
    deploy.yaml:7: engine.max_model_lenn: unknown setting (did you mean max_model_len?)
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import yaml

from ziggurat.actors.ingress.server import IngressConfig
from ziggurat.actors.router.scoring import RouterConfig
from ziggurat.cluster.autoscale import AutoscalingConfig
from ziggurat.cluster.spec import DeploymentSpec, HealthConfig, PoolSpec
from ziggurat.config import ConfigError, EngineConfig

SECTIONS = {"engine": EngineConfig, "ingress": IngressConfig, "health": HealthConfig,
            "autoscaling": AutoscalingConfig, "router": RouterConfig}
_OWN = {f.name: f for f in dataclasses.fields(DeploymentSpec) if f.name not in ("engine", "ingress", "health", "pools",
                                                                                "replicas", "autoscaling", "router")}
# Top-level keys that are not DeploymentSpec fields.
EXTRA = {"model": "str", "address": "str", "api_keys_file": "str", "admin_key_file": "str", "replicas": "int",
         "pools": "list"}


class DeploymentFileError(ValueError):
    pass


def _lines(node, path=(), out=None) -> dict:
    """path tuple -> 1-based line, for every key and list item of the document."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            p = path + (k.value,)
            out[p] = k.start_mark.line + 1
            _lines(v, p, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            p = path + (i,)
            out[p] = v.start_mark.line + 1
            _lines(v, p, out)
    return out


def _name(path) -> str:
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s


class _File:
    def __init__(self, path: str):
        self.path = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise DeploymentFileError(f"{path}: cannot read the deployment file: {e.strerror}") from None
        try:
            self.lines = _lines(yaml.compose(text)) if text.strip() else {}
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise DeploymentFileError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None

    def error(self, path, message: str) -> DeploymentFileError:
        line = None
        for n in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:n]))
            if line is not None:
                break
        where = f"{self.path}:{line}" if line else self.path
        return DeploymentFileError(f"{where}: {_name(path)}: {message}" if path else f"{where}: {message}")


def _check(f: _File, path, value, kind: str):
    """The value if it has the field's type (YAML gives ints, floats, bools, strings, lists, maps)."""
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise f.error(path, "must not be empty")
    base = kind.replace("| None", "").replace("None |", "").strip()
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "dict": isinstance(value, dict),
        "tuple": isinstance(value, list),
        "list": isinstance(value, list),
    }.get(base.split("[")[0], True)
    if not ok:
        want = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "dict": "a mapping", "tuple": "a list", "list": "a list"}.get(base, base)
        raise f.error(path, f"must be {want}, got {value!r}")
    return float(value) if base == "float" else (tuple(value) if base == "tuple" else value)


def _unknown(f: _File, path, key, known) -> DeploymentFileError:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f.error(path, f"unknown setting{hint}; known: {', '.join(sorted(known))}" if not close
                   else f"unknown setting{hint}")


def load(path: str) -> dict:
    """The file as DeploymentSpec.from_flat keywords (plus address, api_keys_file, admin_key_file,
    which the caller handles), types checked; raises DeploymentFileError."""
    f = _File(path)
    data = f.data
    if data is None:
        raise f.error((), "the deployment file is empty")
    if not isinstance(data, dict):
        raise f.error((), "the top level must be a mapping of settings")
    flat: dict = {}
    top_known = set(SECTIONS) | set(_OWN) | set(EXTRA)
    for key, value in data.items():
        path = (key,)
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise f.error(path, "must be a mapping of settings")
            fields = {x.name: x for x in dataclasses.fields(SECTIONS[key])}
            for k, v in value.items():
                if k in ("api_keys", "admin_key"):
                    raise f.error(path + (k,), f"secrets do not go in the file: name a file holding them "
                                               f"with {k}_file")
                if k not in fields:
                    raise _unknown(f, path + (k,), k, [n for n, x in fields.items() if "help" in x.metadata])
                flat[k] = _check(f, path + (k,), v, str(fields[k].type))
        elif key == "pools":
            flat["pools"] = tuple(_pool(f, i, p) for i, p in enumerate(_check(f, path, value, "list")))
        elif key in EXTRA:
            flat[key] = _check(f, path, value, EXTRA[key])
        elif key in _OWN:
            flat[key] = _check(f, path, value, str(_OWN[key].type))
        else:
            raise _unknown(f, path, key, top_known)
    flat["_file"] = f
    return flat


def _pool(f: _File, i: int, p) -> PoolSpec:
    path = ("pools", i)
    if not isinstance(p, dict):
        raise f.error(path, "each pool must be a mapping (role, replicas, ...)")
    fields = {x.name: x for x in dataclasses.fields(PoolSpec)}
    kw = {}
    for k, v in p.items():
        if k not in fields:
            raise _unknown(f, path + (k,), k, fields)
        kw[k] = _check(f, path + (k,), v, str(fields[k].type) if k not in ("resources", "engine") else "dict")
    for k in ("role", "replicas"):
        if k not in kw:
            raise f.error(path, f"{k}: required")
    try:
        return PoolSpec(**kw)
    except ValueError as e:
        raise f.error(path, str(e).split(": ", 1)[-1]) from None


def build(flat: dict, file: _File | None = None, overridden=()) -> DeploymentSpec:
    """DeploymentSpec.from_flat(**flat); a value error about a setting that came from
    the file names its line there."""
    try:
        return DeploymentSpec.from_flat(**flat)
    except (ValueError, ConfigError, TypeError) as e:
        if file is None:
            raise
        msg = str(e)
        field, _, rest = msg.partition(": ")
        if field not in overridden:
            for section, cls in SECTIONS.items():
                if field in {x.name for x in dataclasses.fields(cls)} and (section, field) in file.lines:
                    raise file.error((section, field), rest) from None
            if (field,) in file.lines:
                raise file.error((field,), rest) from None
        raise DeploymentFileError(f"{file.path}: {msg}") from None


def spec_from_file(path: str, **overrides) -> DeploymentSpec:
    """The file's deployment, `overrides` (from_flat names) winning over it (the file's
    address and key-file settings are the caller's: `load` returns them)."""
    flat = load(path)
    file = flat.pop("_file")
    for k in ("address", "api_keys_file", "admin_key_file"):
        flat.pop(k, None)
    return build({**flat, **overrides}, file, set(overrides))


EXAMPLE = """\
# ziggurat deployment file: `ziggurat serve --config deploy.yaml` (flags override what is here).
# Every setting has the same name as its `ziggurat serve --help` flag (dashes become underscores).

model: /models/Llama-3.1-8B-Instruct   # HF-format directory or .gguf file (engine.model)
address: auto                          # the Ray cluster to join: auto, ray://head:10001, or leave out for a local one

engine:                                # every replica's engine (EngineConfig)
  dtype: bfloat16
  max_model_len: 8192
  max_num_seqs: 256
  max_num_batched_tokens: 8192
  enable_prefix_caching: true
  gpu_memory_utilization: 0.9
  kv_transfer_timeout_s: 30.0          # prefill/decode hand-offs

pools:                                 # replicas by role; without this section, one mixed replica
  - role: prefill                      # computes prompts, hands their KV to a decode replica
    replicas: 1
    tensor_parallel_size: 2
    resources: {}                      # e.g. {prefill_node: 1}: nodes started with --resources='{"prefill_node": 8}'
  - role: decode
    replicas: 2
    min_replicas: 1                    # autoscaling between these (cluster/autoscale.py); 0 scales to zero
    max_replicas: 4
    tensor_parallel_size: 1
    engine:                            # this pool's own engine settings
      max_num_seqs: 512
pd_min_prompt_tokens: 64               # shorter prompts are served whole by a decode replica
gpus_per_worker: 1.0

ingress:                               # the HTTP front door (IngressConfig)
  host: 0.0.0.0
  port: 8000
  served_model_name: llama-3.1-8b
  request_timeout_s: 600
ingresses: 2                           # HTTP actors sharing the port
api_keys_file: /etc/ziggurat/api-keys  # one key per line; secrets never go in this file
# admin_key_file: /etc/ziggurat/admin-key

db: /var/lib/ziggurat/tenancy.db       # the ledger: a SQLite path or a postgresql:// URL

autoscaling:                           # for pools with max_replicas > min_replicas
  scale_up_queue: 4.0                  # queued requests per replica that grow a pool
  scale_down_idle_s: 60.0              # an idle replica goes after this long
autoscaler: false                      # true on a cluster whose Ray autoscaler adds nodes (wait for placement)

health:                                # how the supervisor judges replicas
  interval_s: 0.5
  health_timeout_s: 10.0
  step_deadline_s: 60.0
"""
