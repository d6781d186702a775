"""The deployment file: the example validates, every error names file, line and
field, flags override the file, secrets stay out of it."""

from __future__ import annotations

import pytest

from ziggurat.cluster import cli
from ziggurat.cluster.deployment_file import EXAMPLE, DeploymentFileError, load, spec_from_file


def write(tmp_path, text, name="deploy.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_the_example_is_a_valid_deployment(tmp_path, llama_dir):
    path = write(tmp_path, EXAMPLE.replace("/models/Llama-3.1-8B-Instruct", str(llama_dir)))
    spec = spec_from_file(path)
    assert [(p.role, p.replicas, p.tensor_parallel_size) for p in spec.pools] == [("prefill", 1, 2), ("decode", 2, 1)]
    assert spec.pools[1].engine == {"max_num_seqs": 512} and (spec.pools[1].lo, spec.pools[1].hi) == (1, 4)
    assert spec.roles == ["prefill"] + ["decode"] * 4 and spec.initially_serving() == [True, True, True, False, False]
    assert spec.autoscaling.scale_down_idle_s == 60.0 and spec.autoscaler is False
    assert spec.engine.dtype == "bfloat16" and spec.engine.max_model_len == 8192
    assert spec.ingress.port == 8000 and spec.ingresses == 2 and spec.health.interval_s == 0.5
    assert load(path)["api_keys_file"] == "/etc/ziggurat/api-keys" and load(path)["address"] == "auto"


def test_flags_override_the_file(tmp_path, llama_dir):
    path = write(tmp_path, f"model: {llama_dir}\nengine:\n  max_num_seqs: 8\ningress:\n  port: 8000\n")
    spec = spec_from_file(path, port=9001, max_num_seqs=16)
    assert spec.ingress.port == 9001 and spec.engine.max_num_seqs == 16


@pytest.mark.parametrize("text,line,message", [
    ("model: M\nengine:\n  max_model_lenn: 5\n", 3, "engine.max_model_lenn: unknown setting (did you mean max_model_len?)"),
    ("model: M\nengine:\n  block_size: 12\n", 3, "engine.block_size: must be a power of two, got 12"),
    ("model: M\ningress:\n  port: eighty\n", 3, "ingress.port: must be an integer, got 'eighty'"),
    ("model: M\npools:\n  - role: prefill\n    replicas: two\n", 4, "pools[0].replicas: must be an integer"),
    ("model: M\npools:\n  - role: prefil\n    replicas: 1\n", 3, "pools[0]: role must be one of"),
    ("model: M\npools:\n  - replicas: 1\n", 3, "pools[0]: role: required"),
    ("model: M\ningress:\n  api_keys: [sk-1]\n", 3, "secrets do not go in the file"),
    ("model: M\nreplicass: 2\n", 2, "replicass: unknown setting (did you mean replicas?)"),
    ("model: M\nengine: 5\n", 2, "engine: must be a mapping"),
    ("model: /no/such/dir\n", 1, "model: '/no/such/dir' does not exist"),
    ("model: [\n", 2, "not valid YAML"),
    ("", None, "the deployment file is empty"),
])
def test_errors_name_the_file_line_and_field(tmp_path, llama_dir, text, line, message):
    path = write(tmp_path, text.replace("model: M", f"model: {llama_dir}"))
    with pytest.raises(DeploymentFileError) as e:
        spec_from_file(path)
    where = f"{path}:{line}: " if line else f"{path}: "
    assert str(e.value).startswith(where) and message in str(e.value), str(e.value)


def test_cli_config_example_and_check(tmp_path, llama_dir, capsys):
    assert cli.main(["config", "example"]) == 0
    out = capsys.readouterr().out
    assert out == EXAMPLE
    good = write(tmp_path, out.replace("/models/Llama-3.1-8B-Instruct", str(llama_dir)), "good.yaml")
    assert cli.main(["config", "check", good]) == 0
    assert "ok (1 prefill, 2 decode (1-4); model" in capsys.readouterr().out
    bad = write(tmp_path, f"model: {llama_dir}\nengine:\n  dtypee: float32\n", "bad.yaml")
    assert cli.main(["config", "check", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:3: engine.dtypee: unknown setting (did you mean dtype?)" in err
    # serve refuses a bad file with the same one line, before starting anything.
    assert cli.main(["serve", "--config", bad]) == 2
    assert "engine.dtypee" in capsys.readouterr().err
