"""LoRA adapters over HTTP: addressed as models, listed, loaded and unloaded at run time,
refused clearly, metered with their name (tests/conftest.py::OpenAIApp: no Ray, no sockets)."""

from __future__ import annotations

import pytest

from conftest import OpenAIApp
from ziggurat.models.lora_maker import make_adapter

ADMIN = {"Authorization": "Bearer adm"}
BODY = {"prompt": [5, 6, 7, 8, 9, 10, 11], "max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def lora_app(model_factory, tmp_path_factory):
    path = model_factory("llama")
    root = tmp_path_factory.mktemp("http-adapters")
    ads = {n: make_adapter(path, root / n, rank=r, seed=s, scale=0.3) for n, r, s in (("a0", 8, 0), ("a1", 16, 1),
                                                                                      ("big", 32, 2))}
    ads["qwen3"] = make_adapter(model_factory("qwen3"), root / "qwen3", rank=4, seed=0)
    app = OpenAIApp(path, ingress=dict(admin_key="adm", lora_modules=f"a0={ads['a0']}"), enable_lora=True,
                    max_loras=2, num_kv_blocks=128)
    yield app, ads
    app.close()


def test_adapters_as_models(lora_app):
    app, ads = lora_app

    async def go(http, sdk):
        models = (await http.get("/v1/models")).json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("a0", "tiny")]
        assert models[1]["root"] == str(ads["a0"])
        assert (await http.get("/v1/models/tiny:a0")).json()["parent"] == "tiny"
        base = (await http.post("/v1/completions", json={**BODY, "model": "tiny"})).json()
        named = (await http.post("/v1/completions", json={**BODY, "model": "a0"})).json()
        scoped = (await http.post("/v1/completions", json={**BODY, "model": "tiny:a0"})).json()
        assert named["model"] == "a0" and scoped["model"] == "tiny:a0" and base["model"] == "tiny"
        assert named["choices"][0]["text"] == scoped["choices"][0]["text"] != base["choices"][0]["text"]
        sdk_out = await sdk.completions.create(model="a0", **{k: v for k, v in BODY.items() if k != "ignore_eos"},
                                               extra_body={"ignore_eos": True})
        assert sdk_out.choices[0].text == named["choices"][0]["text"]
        assert "a0" in [m.id for m in (await sdk.models.list()).data]
        chat = await http.post("/v1/chat/completions", json={"model": "a0", "max_tokens": 4,
                                                              "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["model"] == "a0"
        return named["id"]

    app.run(go)
    events = list(app.client.scheduler.usage.outbox)
    assert {e.lora for e in events} == {None, "a0"}
    assert all(e.model == "tiny" for e in events)
    assert app.engine.resident_adapters() == ["a0"]


def test_load_and_unload_at_run_time(lora_app):
    app, ads = lora_app

    async def go(http, sdk):
        assert (await http.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(ads["a1"])})
                ).status_code == 401  # the admin key is required
        r = await http.post("/v1/load_lora_adapter", headers=ADMIN,
                            json={"lora_name": "a1", "lora_path": str(ads["a1"])})
        assert r.status_code == 200 and "a1" in r.text
        assert "a1" in [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
        out = await http.post("/v1/completions", json={**BODY, "model": "tiny:a1"})
        a0 = await http.post("/v1/completions", json={**BODY, "model": "a0"})
        assert out.status_code == 200 and out.json()["choices"][0]["text"] != a0.json()["choices"][0]["text"]
        again = await http.post("/v1/load_lora_adapter", headers=ADMIN,
                                json={"lora_name": "a1", "lora_path": str(ads["a1"])})
        assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
        r = await http.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "a1"})
        assert r.status_code == 200
        gone = await http.post("/v1/completions", json={**BODY, "model": "a1"})
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "model"
        assert "a1" not in [m["id"] for m in (await http.get("/v1/models")).json()["data"]]
        r = await http.post("/v1/unload_lora_adapter", headers=ADMIN, json={"lora_name": "a1"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"

    app.run(go)


def test_bad_adapters_and_names_are_refused(lora_app, tmp_path):
    app, ads = lora_app

    async def go(http, sdk):
        for body, param, says in (
            ({"lora_name": "x", "lora_path": str(tmp_path)}, "lora_path", "adapter_config.json: missing"),
            ({"lora_name": "big", "lora_path": str(ads["big"])}, "lora_path", "rank 32 exceeds max_lora_rank (16)"),
            ({"lora_path": str(ads["a1"])}, "lora_name", "non-empty string"),
            ({"lora_name": "tiny", "lora_path": str(ads["a1"])}, "lora_name", "base model"),
            ({"lora_name": "q", "lora_path": str(ads["qwen3"])}, "lora_path", "another base model"),
        ):
            r = await http.post("/v1/load_lora_adapter", headers=ADMIN, json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param and says in err["message"], err
        for model in ("nope", "tiny:nope", "a0:tiny"):
            r = await http.post("/v1/completions", json={**BODY, "model": model})
            assert r.status_code == 404 and r.json()["error"] == {
                "message": f"The model '{model}' does not exist", "type": "invalid_request_error", "param": "model",
                "code": "model_not_found"}
        assert (await http.get("/v1/models/nope")).status_code == 404

    app.run(go)


def test_without_lora_enabled(llama_dir, tmp_path):
    ad = make_adapter(llama_dir, tmp_path / "a", rank=4, seed=0)
    with pytest.raises(ValueError, match="lora_modules: .*not enabled"):
        OpenAIApp(llama_dir, ingress=dict(lora_modules=f"a={ad}"), num_kv_blocks=32).close()
    app = OpenAIApp(llama_dir, ingress=dict(admin_key="adm"), num_kv_blocks=32)
    try:
        async def go(http, sdk):
            r = await http.post("/v1/load_lora_adapter", headers=ADMIN, json={"lora_name": "a", "lora_path": str(ad)})
            assert r.status_code == 400 and "not enabled" in r.json()["error"]["message"]

        app.run(go)
    finally:
        app.close()


def test_lora_modules_format():
    from ziggurat.actors.ingress.server import IngressConfig

    with pytest.raises(ValueError, match="lora_modules: expected name=path, got 'a'"):
        IngressConfig(lora_modules="a")
    from ziggurat.actors.ingress.adapters import parse_lora_modules

    assert parse_lora_modules("a=/x, b=/y c=/z") == [("a", "/x"), ("b", "/y"), ("c", "/z")]
