"""Tenants over HTTP, in process: the real app (auth, experts API, router with the real embedding model) against a
fake vLLM. Who lists, names, routes to and manages which expert; expert uploads and every refusal of one; the
audit line and counter of pool changes. Real processes and two replicas: tests/integration/test_tenants.py."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from adapters.card import ExpertCard
from adapters.validate import ModelShape
from service.app import create_app
from service.settings import Settings
from tests.unit.fake_vllm import FakeVLLM, serve_fake_vllm
from training.synthetic import write_random_lora

pytestmark = pytest.mark.asyncio(loop_scope="module")
BASE = "SmolLM2-135M-Instruct"
ADMIN, PLAIN, KEY_A, KEY_B = "admin-key", "plain-key", "acme-key", "beta-key"
SECRET = "How do I file the merger papers for Project Falcon with the regulator?"
SHARED = {
    "cooking": ("Cooking and baking: recipes, bread dough, pancakes, boiling eggs, sauces, pasta.",
                ["How long should I boil an egg?", "How do I make a tomato sauce for pasta?"]),
    "arith": ("Arithmetic: adds, subtracts and multiplies integers.", ["What is 12 times 7?", "Compute 345 plus 289."]),
}
PRIVATE = ("beta-legal", "Corporate law: mergers, acquisitions and regulatory filings.",
           [SECRET, "Which forms does a merger filing with the regulator need?", "Draft a merger notice."])


@dataclass
class Stack:
    client: httpx.AsyncClient
    fake: FakeVLLM
    root: Path
    tenants: Path
    shape: ModelShape

    async def get(self, path: str, key: str) -> httpx.Response:
        return await self.client.get(path, headers={"authorization": f"Bearer {key}"})

    async def post(self, path: str, key: str, **kw) -> httpx.Response:
        return await self.client.post(path, headers={"authorization": f"Bearer {key}"}, **kw)

    async def delete(self, path: str, key: str) -> httpx.Response:
        return await self.client.delete(path, headers={"authorization": f"Bearer {key}"})

    async def names(self, path: str, key: str) -> set[str]:
        data = (await self.get(path, key)).json()["data"]
        return {d.get("name") or d["id"] for d in data}

    async def route(self, key: str, prompt: str = SECRET, **routing) -> list[str]:
        r = await self.post("/v1/route", key, json={"prompt": prompt, **({"routing": routing} if routing else {})})
        assert r.status_code == 200, r.text
        return [c["name"] for c in r.json()["routing"]["experts"]]

    async def upload(self, key: str, archive: bytes, filename: str = "x.tar.gz", **fields) -> httpx.Response:
        data = {k: (json.dumps(v) if isinstance(v, list) else str(v)) for k, v in fields.items()}
        return await self.post("/v1/experts", key, files={"file": (filename, archive)}, data=data)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory) -> AsyncIterator[Stack]:
    settings = Settings()
    shape = ModelShape.from_model_dir(settings.resolved_base_model_dir)
    root = tmp_path_factory.mktemp("experts")
    state = tmp_path_factory.mktemp("state")
    tenants = state / "experts"
    for seed, (name, (description, examples)) in enumerate(SHARED.items()):
        write_random_lora(root / name, shape=shape, base_name=BASE, seed=seed, rank=2, targets=("q_proj",),
                          card=ExpertCard(name=name, description=description, examples=examples))
    name, description, examples = PRIVATE
    write_random_lora(tenants / "beta" / "legal", shape=shape, base_name=BASE, seed=5, rank=2, targets=("q_proj",),
                      card=ExpertCard(name=name, description=description, examples=examples))
    async with serve_fake_vllm() as fake:
        settings = settings.model_copy(update={
            "backend_urls": [fake.url], "redis_url": None, "state_dir": state, "library_dir": root / "no-library",
            "expert_roots": [root], "api_keys": [PLAIN], "admin_keys": [ADMIN],
            "tenant_keys": [f"acme:{KEY_A}", f"beta:{KEY_B}"],
            "upload_max_mb": 1, "upload_max_unpacked_mb": 1, "upload_max_entries": 8})
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://flock") as client:
                s = Stack(client, fake, root, tenants, shape)
                for name in SHARED:
                    r = await s.post("/v1/experts", ADMIN, json={"path": str(root / name)})
                    assert r.status_code == 201, r.text
                r = await s.post("/v1/experts", KEY_B, json={"path": str(tenants / "beta" / "legal")})
                assert r.status_code == 201 and r.json()["tenant"] == "beta", r.text
                yield s


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


async def test_each_key_lists_what_it_may_see(stack: Stack):
    shared = {"cooking", "arith"}
    for key, extra in ((KEY_A, set()), (PLAIN, set()), (KEY_B, {"beta-legal"}), (ADMIN, {"beta-legal"})):
        assert await stack.names("/v1/experts", key) == shared | extra, key
        assert await stack.names("/v1/models", key) == shared | extra | {"auto", BASE}, key
    # The pool version a tenant sees does not move with another tenant's experts.
    assert (await stack.get("/v1/experts", KEY_A)).json()["pool_version"] == \
        (await stack.get("/v1/experts", PLAIN)).json()["pool_version"]


async def test_another_tenants_expert_is_not_found_like_a_missing_one(stack: Stack):
    def same(r: httpx.Response, name: str) -> tuple:
        e = error_of(r)
        return r.status_code, e["code"], e["type"], e["param"], e["message"].replace(name, "X")

    for key in (KEY_A, PLAIN):
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        hidden = await stack.post("/v1/chat/completions", key, json={**chat, "model": "beta-legal"})
        missing = await stack.post("/v1/chat/completions", key, json={**chat, "model": "beta-nothing"})
        assert same(hidden, "beta-legal") == same(missing, "beta-nothing") and hidden.status_code == 404
        assert error_of(hidden)["code"] == "model_not_found"
        assert (await stack.get("/v1/models/beta-legal", key)).status_code == 404
        r = await stack.post("/v1/route", key, json={"model": "beta-legal", "prompt": "hi"})
        assert r.status_code == 404
    r = await stack.delete("/v1/experts/beta-legal", KEY_A)
    assert same(r, "beta-legal") == same(await stack.delete("/v1/experts/beta-nothing", KEY_A), "beta-nothing")
    assert r.status_code == 404
    r = await stack.delete("/v1/experts/beta-legal", PLAIN)
    assert r.status_code == 403  # a key of no tenant changes no pool
    r = await stack.delete("/v1/experts/cooking", KEY_A)
    assert r.status_code == 403 and error_of(r)["code"] == "insufficient_permissions"
    r = await stack.post("/v1/experts/beta-legal/check", KEY_A)
    assert r.status_code == 404
    assert "beta-legal" in await stack.names("/v1/experts", KEY_B)  # untouched


async def test_private_expert_is_routed_for_its_owner_and_never_for_others(stack: Stack):
    for mode in ("global", "merge"):
        assert (await stack.route(KEY_B, mode=mode))[0] == "beta-legal", mode
        assert (await stack.route(ADMIN, mode=mode))[0] == "beta-legal", mode  # it does match best
        for key in (KEY_A, PLAIN):
            assert "beta-legal" not in await stack.route(key, mode=mode), (key, mode)
    # A generated answer too: the fake backend is asked for the private adapter only for its owner.
    for key, expect in ((KEY_A, False), (KEY_B, True)):
        r = await stack.post("/v1/chat/completions", key, json={"model": "auto", "max_tokens": 2,
                                                                 "messages": [{"role": "user", "content": SECRET}]})
        assert r.status_code == 200, r.text
        assert (stack.fake.requests[-1]["model"] == "beta-legal") is expect
        assert ("beta-legal" in r.headers["x-flock-experts"]) is expect


async def test_metrics_do_not_name_private_experts(stack: Stack):
    text = (await stack.client.get("/metrics")).text
    assert "beta-legal" not in text
    assert 'flock_expert_selections_total{expert="private",mode="global",tenant="beta"}' in text
    assert 'flock_pool_changes_total{action="register",tenant="beta"}' in text


async def test_registering_by_path_only_from_the_tenants_own_directory(stack: Stack):
    other = stack.tenants / "beta" / "legal"
    for path in (other, stack.root / "cooking", stack.tenants / "acme" / ".." / "beta" / "legal"):
        r = await stack.post("/v1/experts", KEY_A, json={"path": str(path)})
        assert r.status_code == 403 and error_of(r)["code"] == "path_not_allowed", r.text
        assert "tenant 'acme'" in error_of(r)["message"]
    r = await stack.post("/v1/experts", KEY_A, json={"path": str(other), "tenant": "beta"})
    assert r.status_code == 403
    r = await stack.post("/v1/experts", KEY_A, json={"path": str(other), "name": "beta-legal", "replace": True})
    assert r.status_code == 403  # outside acme's directory: refused before anything is read


# --- uploads ------------------------------------------------------------------------------------------------
def adapter_files(stack: Stack, name: str, seed: int = 7) -> dict[str, bytes]:
    src = write_random_lora(stack.root / "src" / name, shape=stack.shape, base_name=BASE, seed=seed, rank=2,
                            targets=("q_proj",), card=ExpertCard(name=name, description=f"{name}: astronomy, "
                            "planets, stars and telescopes.", examples=["How far away is Mars?"]))
    return {f.name: f.read_bytes() for f in src.iterdir()}


def tar_gz(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def files_tar(files: dict[str, bytes], top: str = "") -> bytes:
    return tar_gz([(member(f"{top}{n}"), d) for n, d in files.items()])


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            z.writestr(n, d)
    return buf.getvalue()


def leftovers(stack: Stack, tenant: str) -> list[str]:
    d = stack.tenants / tenant
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


async def test_upload_round_trip(stack: Stack, caplog):
    files = adapter_files(stack, "acme-stars")
    caplog.set_level(logging.INFO, logger="flock.audit")
    r = await stack.upload(KEY_A, files_tar(files, top="acme-stars/"))
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["tenant"] == "acme" and Path(out["path"]).parent == (stack.tenants / "acme").resolve()
    assert "acme-stars" in await stack.names("/v1/experts", KEY_A)
    assert "acme-stars" not in await stack.names("/v1/experts", KEY_B)
    prompt = "How far away is Mars from the Earth?"
    assert (await stack.route(KEY_A, prompt))[0] == "acme-stars"
    assert "acme-stars" not in await stack.route(KEY_B, prompt)
    lines = [r.getMessage() for r in caplog.records if r.name == "flock.audit"]
    assert any("action=upload expert=acme-stars tenant=acme key=" in line for line in lines), lines
    assert not any(KEY_A in line for line in lines)  # the key's id, never the key
    # A zip, with the card's fields given in the form; then removed, files and all.
    r = await stack.upload(KEY_A, zip_of(files), "x.zip", name="acme-moon", description="The moon.",
                           examples=["What are the phases of the moon?"])
    assert r.status_code == 201 and r.json()["name"] == "acme-moon", r.text
    moon = Path(r.json()["path"])
    assert (await stack.delete("/v1/experts/acme-moon", KEY_A)).status_code == 200
    assert not moon.exists() and "acme-moon" not in await stack.names("/v1/experts", KEY_A)
    assert (await stack.delete("/v1/experts/acme-stars", KEY_A)).status_code == 200
    assert leftovers(stack, "acme") == []
    lines = [r.getMessage() for r in caplog.records if r.name == "flock.audit"]
    assert any("action=remove expert=acme-moon tenant=acme" in line for line in lines)
    text = (await stack.client.get("/metrics")).text
    assert 'flock_pool_changes_total{action="upload",tenant="acme"} 2.0' in text


def _bomb() -> bytes:
    return tar_gz([(member("zeros.txt"), bytes(3 << 20))])  # 3 MiB of zeros: a few KiB packed


def _bomb_zip() -> bytes:
    return zip_of({"zeros.txt": bytes(3 << 20)})


def _zip_lying_header() -> bytes:
    raw = bytearray(zip_of({"zeros.txt": bytes(3 << 20)}))
    # Rewrite the uncompressed size in the local header and the central directory to 10 bytes.
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.find(sig)
        raw[at + offset: at + offset + 4] = (10).to_bytes(4, "little")
    return bytes(raw)


def _zip_symlink() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("adapter_config.json")
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        z.writestr(info, "/etc/passwd")
    return buf.getvalue()


REFUSALS = {
    "parent traversal": (lambda f: tar_gz([(member("../evil.json"), b"{}")]), 400, "climbs out"),
    "nested traversal": (lambda f: tar_gz([(member("x/../../evil.json"), b"{}")]), 400, "climbs out"),
    "absolute name": (lambda f: tar_gz([(member("/tmp/evil.json"), b"{}")]), 400, "absolute"),
    "zip traversal": (lambda f: zip_of({"../evil.json": b"{}"}), 400, "climbs out"),
    "symlink": (lambda f: tar_gz([(member("adapter_config.json", tarfile.SYMTYPE, "/etc/passwd"), None)]), 400,
                "link"),
    "hard link": (lambda f: tar_gz([(member("adapter_config.json", tarfile.LNKTYPE, "/etc/passwd"), None)]), 400,
                  "link"),
    "zip symlink": (lambda f: _zip_symlink(), 400, "link"),
    "device": (lambda f: tar_gz([(member("dev.json", tarfile.CHRTYPE), None)]), 400, "device"),
    "fifo": (lambda f: tar_gz([(member("pipe.json", tarfile.FIFOTYPE), None)]), 400, "device"),
    "pickled weights": (lambda f: files_tar({**f, "adapter_model.bin": b"\x80\x04pickle"}), 400, "pickled"),
    "too many entries": (lambda f: files_tar({f"n{i}.txt": b"x" for i in range(9)}), 400, "more than 8 entries"),
    "too large": (lambda f: files_tar({"noise.txt": __import__("os").urandom(3 << 19)}), 413, "exceeds"),
    "bomb": (lambda f: _bomb(), 413, "unpacks to more than"),
    "zip bomb": (lambda f: _bomb_zip(), 413, "unpacks to more than"),
    "zip with a lying size": (lambda f: _zip_lying_header(), 400, "damaged"),
    "not an archive": (lambda f: b"just some text", 400, "neither"),
    "invalid adapter": (lambda f: files_tar({k: v for k, v in f.items() if k != "adapter_model.safetensors"}), 422,
                        "missing"),
    "wrong namespace": (lambda f: files_tar({**f, "card.json": json.dumps(
        {"name": "beta-x", "description": "d"}).encode()}), 403, "start with 'acme-'"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_upload_refusals_leave_nothing_behind(stack: Stack, case: str):
    build, status, words = REFUSALS[case]
    before = await stack.names("/v1/experts", ADMIN)
    r = await stack.upload(KEY_A, build(adapter_files(stack, "acme-refused", seed=11)))
    assert r.status_code == status, (case, r.status_code, r.text)
    assert words in error_of(r)["message"], (case, error_of(r))
    assert await stack.names("/v1/experts", ADMIN) == before
    assert leftovers(stack, "acme") == [] and not (stack.tenants.parent / "evil.json").exists()
    assert not Path("/tmp/evil.json").exists()


async def test_upload_permissions(stack: Stack):
    files = adapter_files(stack, "acme-perm", seed=12)
    r = await stack.upload(PLAIN, files_tar(files))
    assert r.status_code == 403
    r = await stack.upload(KEY_A, files_tar(files), tenant="beta")
    assert r.status_code == 403 and leftovers(stack, "beta") == ["legal"]
    # An admin uploads for a tenant, or a shared expert.
    r = await stack.upload(ADMIN, files_tar(files), tenant="acme")
    assert r.status_code == 201 and r.json()["tenant"] == "acme", r.text
    assert (await stack.delete("/v1/experts/acme-perm", ADMIN)).status_code == 200
    r = await stack.upload(ADMIN, files_tar(files), name="planets")
    assert r.status_code == 201 and r.json()["tenant"] is None, r.text
    assert "planets" in await stack.names("/v1/experts", KEY_B)
    assert (await stack.delete("/v1/experts/planets", ADMIN)).status_code == 200
    r = await stack.post("/v1/experts", KEY_A, files={"file": ("a", b"x")}, data={"bogus": "1"})
    assert r.status_code == 400 and "bogus" in error_of(r)["message"]
    r = await stack.post("/v1/experts", KEY_A, data={"name": "x"}, files={"other": ("a", b"x")})
    assert r.status_code == 400
