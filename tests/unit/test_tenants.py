"""Tenants: keys, who sees and manages which expert, where a tenant's experts may come from, and routing that
never leaves the caller's visible set (real pool on synthetic adapters, a hash embedder; no server)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from starlette.requests import Request

from adapters.card import ExpertCard
from adapters.errors import ForbiddenPath, NameNotAllowed, NotPermitted, UnknownExpert
from adapters.pool import ExpertPool
from adapters.tenants import EVERYTHING, SHARED, Scope
from adapters.validate import ModelShape
from router.cache import RoutingCache
from router.decision import RoutingDecision, RoutingParams
from router.router import Router, visible_sets
from service.auth import Authenticator, parse_tenant_keys
from service.errors import APIError
from training.synthetic import write_random_lora

BASE = "SmolLM2-135M-Instruct"
SHAPE = ModelShape.from_config({"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2})
A, B = Scope(tenant="acme"), Scope(tenant="beta")


# --- keys -------------------------------------------------------------------------------------------------
def request(key: str | None) -> Request:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return Request({"type": "http", "headers": headers})


def test_tenant_keys_from_the_environment_and_a_file(tmp_path):
    file = tmp_path / "keys"
    file.write_text("# comment\nbeta:key-b2\n\n")
    auth = Authenticator(["plain"], ["root"], tenant_keys=["acme:key-a", " beta : key-b "], tenant_keys_file=file)
    assert auth.authenticate(request("key-a"), admin=False).tenant == "acme"
    assert auth.authenticate(request("key-b"), admin=False).scope == B
    assert auth.authenticate(request("key-b2"), admin=False).tenant == "beta"
    plain = auth.authenticate(request("plain"), admin=False)
    assert plain.tenant is None and not plain.admin and plain.scope == SHARED
    assert auth.authenticate(request("root"), admin=True).scope == EVERYTHING
    with pytest.raises(APIError) as e:
        auth.authenticate(request("key-a"), admin=True)  # a tenant key is no admin key
    assert e.value.status == 403
    with pytest.raises(APIError) as e:
        auth.authenticate(request("acme:key-a"), admin=False)
    assert e.value.status == 401
    assert not auth.open and not Authenticator([], [], tenant_keys=["acme:k"]).open
    assert Authenticator([], [], tenant_keys=[]).open


@pytest.mark.parametrize("entry, problem", [
    ("SECRETKEY", "TENANT:KEY"), ("acme:", "TENANT:KEY"), ("Acme:SECRETKEY", "tenant name"),
    ("a-b:SECRETKEY", "no '-'"),
])
def test_malformed_tenant_keys_stop_the_start_without_showing_the_key(entry, problem):
    with pytest.raises(ValueError) as e:
        parse_tenant_keys(["good:fine", entry])
    assert problem in str(e.value) and "#2" in str(e.value) and "SECRETKEY" not in str(e.value)


def test_a_key_has_one_role():
    with pytest.raises(ValueError, match="one role"):
        Authenticator([], ["same"], tenant_keys=["acme:same"])
    with pytest.raises(ValueError, match="two tenants"):
        Authenticator([], [], tenant_keys=["acme:k", "beta:k"])


def test_scopes():
    assert SHARED.sees(None) and not SHARED.sees("acme") and not SHARED.manages(None)
    assert A.sees(None) and A.sees("acme") and not A.sees("beta")
    assert A.manages("acme") and not A.manages(None) and not A.manages("beta")
    assert EVERYTHING.sees("beta") and EVERYTHING.manages(None)


# --- the pool -----------------------------------------------------------------------------------------------
def lora(path: Path, name: str, seed: int = 0, examples: list[str] | None = None) -> Path:
    return write_random_lora(path, shape=SHAPE, base_name=BASE, seed=seed,
                             card=ExpertCard(name=name, description=f"{name} questions", examples=examples or []))


def make_pool(tmp_path: Path, state: Path | None = None) -> ExpertPool:
    state = state or tmp_path / "state"
    return ExpertPool(state_file=state / "pool.json", roots=[(tmp_path / "shared").resolve()], base_name=BASE,
                      shape=SHAPE, max_rank=16, tenants_dir=tmp_path / "state" / "experts")


def test_a_tenant_registers_only_from_its_own_directory(tmp_path):
    pool = make_pool(tmp_path)
    experts = tmp_path / "state" / "experts"
    own = lora(experts / "acme" / "legal", "acme-legal")
    other = lora(experts / "beta" / "legal", "beta-legal")
    outside = lora(tmp_path / "shared" / "cooking", "acme-cooking")
    assert pool.add(own, tenant="acme", scope=A).tenant == "acme"
    for path in (other, outside, experts / "acme" / ".." / "beta" / "legal", Path("/etc")):
        with pytest.raises(ForbiddenPath) as e:
            pool.add(path, tenant="acme", scope=A)
        assert "tenant 'acme'" in e.value.message and "beta" not in e.value.message.split("outside")[1]
    # A link inside the tenant's directory is resolved first: one to another tenant's adapter is refused...
    os.symlink(other, experts / "acme" / "stolen")
    with pytest.raises(ForbiddenPath):
        pool.add(experts / "acme" / "stolen", tenant="acme", scope=A)
    # ...and so is a directory of its own whose weights link to another tenant's.
    sneaky = lora(experts / "acme" / "sneaky", "acme-sneaky", seed=3)
    (sneaky / "adapter_model.safetensors").unlink()
    os.symlink(other / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")
    with pytest.raises(ForbiddenPath, match="links outside"):
        pool.add(sneaky, tenant="acme", scope=A)
    # A tenant key registers neither shared experts nor another tenant's.
    with pytest.raises(NotPermitted):
        pool.add(outside, scope=A)
    with pytest.raises(NotPermitted):
        pool.add(other, tenant="beta", scope=A)


def test_names_another_tenants_expert_as_if_it_did_not_exist(tmp_path):
    pool = make_pool(tmp_path)
    experts = tmp_path / "state" / "experts"
    pool.add(lora(tmp_path / "shared" / "cooking", "cooking"))
    pool.add(lora(experts / "beta" / "legal", "beta-legal"), tenant="beta", scope=B)
    assert [e.name for e in pool.experts(A)] == ["cooking"]
    assert [e.name for e in pool.experts(B)] == ["beta-legal", "cooking"]
    assert [e.name for e in pool.experts(EVERYTHING)] == ["beta-legal", "cooking"]
    assert pool.visible("beta-legal", A) is None and pool.visible("beta-legal", B) is not None
    # Removing: another tenant's expert and a missing one get the same answer.
    answers = []
    for name in ("beta-legal", "nothing-here"):
        with pytest.raises(UnknownExpert) as e:
            pool.remove(name, A)
        answers.append((e.value.status, e.value.code, e.value.message.replace(name, "X")))
    assert answers[0] == answers[1] and answers[0][:2] == (404, "model_not_found")
    with pytest.raises(NotPermitted):
        pool.remove("cooking", A)  # shared: visible, but managed by admin keys
    # Replacing another tenant's expert: the same 404, whether it exists or not.
    for seed, name in enumerate(("beta-legal", "beta-nothing"), 5):
        with pytest.raises(UnknownExpert):
            pool.add(lora(experts / "acme" / name, name, seed=seed), tenant="acme", scope=A, replace=True)
    # Registering outside the tenant's namespace: refused by the name alone.
    with pytest.raises(NameNotAllowed, match="start with 'acme-'"):
        pool.add(lora(experts / "acme" / "plain", "legal", seed=9), tenant="acme", scope=A)
    assert pool.get("beta-legal").tenant == "beta"  # untouched by all of the above


def test_owners_survive_a_restart_and_replicas(tmp_path):
    pool = make_pool(tmp_path)
    pool.add(lora(tmp_path / "state" / "experts" / "beta" / "legal", "beta-legal"), tenant="beta", scope=B)
    again = make_pool(tmp_path)
    again.load()
    assert again.get("beta-legal").tenant == "beta"
    replica = make_pool(tmp_path, state=tmp_path / "other")  # its own state file, the same tenants' directory
    replica.adopt(list(pool.entries().values()))
    assert replica.get("beta-legal").tenant == "beta"
    # An entry whose name is outside its tenant's namespace (a tampered registry) is dropped.
    forged = {**pool.entries()["beta-legal"], "tenant": "acme"}
    assert replica.adopt([forged]) and replica.get("beta-legal") is None


# --- routing ------------------------------------------------------------------------------------------------
DIM = 64


class HashEmbedder:
    """Deterministic unit vectors from a text's hash: a query equal to a card example lands next to that card."""

    dim = DIM

    def __init__(self) -> None:
        self.embedder = self

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        out = np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=DIM)
                        for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    async def embed(self, text: str) -> np.ndarray:
        return (await self.embed_many([text]))[0]


class LocalOnlyCache(RoutingCache):
    """The decision cache without Redis: what the router keys and stores is what is tested."""

    def __init__(self) -> None:
        super().__init__("redis://127.0.0.1:1", 3600)
        self.keys: list[str] = []

    async def get_remote(self, key: str) -> tuple[RoutingDecision | None, str]:
        return None, "miss"

    async def set(self, key: str, decision: RoutingDecision) -> None:
        self.keys.append(key)
        self.local.put(key, decision, self.ttl_s)


SECRET = "how do I file the merger papers for project falcon"


def tenant_pool(tmp_path: Path) -> ExpertPool:
    pool = make_pool(tmp_path)
    experts = tmp_path / "state" / "experts"
    pool.add(lora(tmp_path / "shared" / "cooking", "cooking", 1, ["boil an egg", "bake bread"]))
    pool.add(lora(experts / "acme" / "maths", "acme-maths", 2, ["add two numbers", "multiply these"]),
             tenant="acme", scope=A)
    pool.add(lora(experts / "beta" / "legal", "beta-legal", 3, [SECRET, "draft an NDA"]), tenant="beta", scope=B)
    return pool


async def test_a_private_expert_is_routed_for_its_owner_only_cached_or_not(tmp_path):
    pool = tenant_pool(tmp_path)
    cache = LocalOnlyCache()
    router = Router(pool, HashEmbedder(), cache, fixed_threshold=0.0)  # type: ignore[arg-type]
    try:
        await router.rebuild_index()
        assert visible_sets(pool.servable()) == {"*": [0, 1, 2], "": [2], "acme": [0, 2], "beta": [1, 2]}
        assert router.view(B).names == ["beta-legal", "cooking"] and router.view(A).names == ["acme-maths", "cooking"]
        assert router.view(SHARED).names == router.view(Scope(tenant="nobody")).names == ["cooking"]
        for mode in ("global", "merge"):
            params = RoutingParams(mode=mode)
            owner = await router.route(SECRET, params, B)  # decided and cached for beta first
            await router.drain()
            assert owner.decision.experts[0].name == "beta-legal"
            for scope in (A, SHARED, Scope(tenant="nobody")):
                for _ in range(2):  # the second time from the cache, if the first was cached under this key
                    result = await router.route(SECRET, params, scope)
                    await router.drain()
                    names = {c.name for c in result.decision.experts}
                    assert "beta-legal" not in names and names <= set(router.view(scope).names), (mode, scope)
            assert (await router.route(SECRET, params, B)).cache == "hit"
        # One key per visible set: no two scopes that see different experts share a cached decision.
        versions = {k.split(":")[3] for k in cache.keys}
        assert len(versions) == 3  # beta, acme, shared-only ('nobody' sees what shared-only keys see)
    finally:
        await cache.close()


async def test_calibration_of_one_tenant_ignores_the_others_experts(tmp_path):
    pool = tenant_pool(tmp_path)
    router = Router(pool, HashEmbedder(), None)  # type: ignore[arg-type]
    await router.rebuild_index()
    before = {k: (router.view(s).threshold, router.view(s).pool_version) for k, s in (("a", A), ("s", SHARED))}
    beta_before = router.view(B).pool_version
    # beta adds an expert with many examples: beta's view and the whole pool's change, acme's does not.
    pool.add(lora(tmp_path / "state" / "experts" / "beta" / "tax", "beta-tax", 4,
                  [f"tax question {i}" for i in range(20)]), tenant="beta", scope=B)
    await router.rebuild_index()
    after = {k: (router.view(s).threshold, router.view(s).pool_version) for k, s in (("a", A), ("s", SHARED))}
    assert after == before and router.view(B).pool_version != beta_before
    assert router.view(EVERYTHING) is router.index and "beta-tax" in router.index.names


async def test_without_tenants_there_is_one_index(tmp_path):
    pool = make_pool(tmp_path)
    pool.add(lora(tmp_path / "shared" / "cooking", "cooking", 1, ["boil an egg"]))
    router = Router(pool, HashEmbedder(), None)  # type: ignore[arg-type]
    await router.rebuild_index()
    assert router.view(SHARED) is router.view(A) is router.index


# --- archives -----------------------------------------------------------------------------------------------
def test_a_huge_tar_header_is_cut_off_before_tarfile_reads_it_into_memory(tmp_path):
    """A GNU long name of 3 MiB is read by tarfile itself, whole, before any member reaches the writer: the
    decompressed stream is bounded underneath it."""
    import io
    import tarfile

    from adapters.archive import ArchiveLimits, ArchiveTooLarge, unpack

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("a" * (3 << 20) + ".json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    buf.seek(0)
    with pytest.raises(ArchiveTooLarge, match="unpacks to more than"):
        unpack(buf, tmp_path / "dest", ArchiveLimits(max_entries=8, max_unpacked_bytes=1 << 20))
    assert not (tmp_path / "dest").exists()


def test_corrupt_compressed_data_is_a_clear_refusal(tmp_path):
    import io
    import tarfile
    import zipfile

    from adapters.archive import ArchiveLimits, ArchiveRefused, unpack

    limits = ArchiveLimits(max_entries=8, max_unpacked_bytes=1 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("card.json")
        data = os.urandom(4096)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    raw[40:200] = bytes(160)  # the deflate stream broken
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("card.json", b"{" * 5000)
    zraw = bytearray(zbuf.getvalue())
    zraw[40:60] = b"\xff" * 20
    for n, blob in enumerate((bytes(raw), bytes(zraw), bytes(raw[:60]))):
        with pytest.raises(ArchiveRefused, match="damaged|unreadable"):
            unpack(io.BytesIO(blob), tmp_path / f"d{n}", limits)
        assert not (tmp_path / f"d{n}").exists()
