"""The expert pool's state file across restarts and checkouts (synthetic adapters, no server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from adapters.card import ExpertCard
from adapters.pool import ExpertPool
from adapters.validate import ModelShape
from training.synthetic import write_random_lora

BASE = "SmolLM2-135M-Instruct"
SHAPE = ModelShape.from_config({"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2})


def library(root: Path, names=("cooking", "law")) -> Path:
    lib = root / "library"
    for seed, name in enumerate(names):
        write_random_lora(lib / name, shape=SHAPE, base_name=BASE, seed=seed,
                          card=ExpertCard(name=name, description=f"{name} questions"))
    return lib


def pool(state: Path, roots: list[Path], seed_dir: Path) -> ExpertPool:
    p = ExpertPool(state_file=state, roots=[r.resolve() for r in roots], base_name=BASE, shape=SHAPE, max_rank=16)
    p.load(seed_dir=seed_dir)
    return p


def test_state_from_a_deleted_checkout_uses_this_checkouts_library(tmp_path):
    """The default state directory is shared by every checkout: a pool seeded by a clone that was deleted
    since must come up with this clone's library, not empty, and save the paths that resolve now."""
    state = tmp_path / "state" / "pool.json"
    old = library(tmp_path / "clone1")
    assert len(pool(state, [old], old)) == 2
    shutil.rmtree(tmp_path / "clone1")

    new = library(tmp_path / "clone2")
    p = pool(state, [new], new)
    assert [e.name for e in p.experts()] == ["cooking", "law"]
    assert all(e.path.parent == new.resolve() for e in p.experts())
    saved = json.loads(state.read_text())["experts"]
    assert {Path(e["path"]).parent for e in saved} == {new.resolve()}


def test_removed_library_expert_stays_removed(tmp_path):
    state = tmp_path / "state" / "pool.json"
    lib = library(tmp_path / "clone")
    pool(state, [lib], lib).remove("law")
    assert [e.name for e in pool(state, [lib], lib).experts()] == ["cooking"]


def test_vanished_user_expert_is_not_replaced_by_a_library_namesake(tmp_path):
    """Only library experts are re-pointed: a registered expert whose files went away is dropped, even when
    the library holds an adapter directory of the same name."""
    state = tmp_path / "state" / "pool.json"
    lib = library(tmp_path / "clone", names=("law",))
    mine = tmp_path / "mine"
    write_random_lora(mine / "cooking", shape=SHAPE, base_name=BASE, seed=7,
                      card=ExpertCard(name="cooking", description="my own cooking expert"))
    p = pool(state, [lib, mine], lib)
    p.add(mine / "cooking")
    shutil.rmtree(mine)
    library(tmp_path / "clone", names=("cooking",))  # the library now also has a "cooking"
    assert [e.name for e in pool(state, [lib, mine], lib).experts()] == ["law"]


def test_a_state_file_that_cannot_be_written_refuses_the_change_and_keeps_the_pool(tmp_path, monkeypatch):
    """A full or read-only state directory: registration fails with a clear error; the pool in memory and on
    disk is unchanged, and no temporary file is left behind."""
    import builtins
    import errno

    import pytest

    from adapters.errors import StateNotWritable

    lib = library(tmp_path)
    state = tmp_path / "state" / "pool.json"
    p = pool(state, [lib], lib)
    saved = state.read_text()
    version = p.version
    extra = lib / "extra2"
    write_random_lora(extra, shape=SHAPE, base_name=BASE, seed=5, card=ExpertCard(name="extra2", description="x"))
    real_open = builtins.open

    def full_disk(path, mode="r", *args, **kw):
        if "w" in mode and str(path).startswith(str(state.parent)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(StateNotWritable, match="No space left"):
        p.add(extra)
    monkeypatch.undo()
    assert p.version == version and "extra2" not in {e.name for e in p.experts()}
    assert state.read_text() == saved and [f.name for f in state.parent.iterdir()] == ["pool.json"]
    p.add(extra)  # the disk has room again
    assert "extra2" in {e.name for e in p.experts()}


def test_adopting_a_pool_with_a_corrupt_expert_quarantines_it_instead_of_dropping_it(tmp_path):
    """Another replica's view names an expert whose weights are broken here (truncated mid-copy, say): it stays
    registered, quarantined, so this replica never publishes a pool without it; repaired, it is released."""
    lib = library(tmp_path)
    p = pool(tmp_path / "state" / "pool.json", [lib], lib)
    entries = list(p.entries().values())
    p.remove("law")  # so that adopting the entries reads law's files (an unchanged entry is not read again)
    weights = lib / "law" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    p.adopt(entries)
    assert [e.name for e in p.experts()] == ["cooking", "law"]
    assert [e.name for e in p.servable()] == ["cooking"] and "law" in p.quarantined
    weights.write_bytes(good)
    assert p.recheck(force=True) == ["law"] and [e.name for e in p.servable()] == ["cooking", "law"]
    p.remove("law")
    shutil.rmtree(lib / "law")  # files gone altogether: dropped, as before
    p.adopt(entries)
    assert [e.name for e in p.experts()] == ["cooking"]


def test_a_composite_is_keyed_by_its_parts_not_by_the_pool(tmp_path):
    """Registering another expert leaves every composite's key alone; changing a part's weights changes it."""
    from service.resolve import parts_version

    lib = library(tmp_path, names=("cooking", "law", "tax"))
    parts = [("cooking", 0.5, lib / "cooking"), ("law", 0.5, lib / "law")]
    p = pool(tmp_path / "state" / "pool.json", [lib], lib)
    before, version = parts_version(parts), p.version
    p.remove("tax")
    assert p.version != version and parts_version(parts) == before
    write_random_lora(lib / "law", shape=SHAPE, base_name=BASE, seed=9, card=ExpertCard(name="law", description="x"))
    assert parts_version(parts) != before


def test_a_change_validates_only_what_changed(tmp_path, monkeypatch):
    """Registering into a pool, and adopting another replica's view of it, check the files of the experts that
    are new or changed only: the others' entries are kept as they are (O(change), not O(pool))."""
    import adapters.pool as pool_module

    lib = library(tmp_path, names=tuple(f"e{i}" for i in range(30)))
    p = pool(tmp_path / "state" / "pool.json", [lib], lib)
    other = pool(tmp_path / "other" / "pool.json", [lib], lib)  # a replica, seeded from the same library
    checked: list[str] = []
    real = pool_module.validate_adapter
    monkeypatch.setattr(pool_module, "validate_adapter", lambda d, **kw: checked.append(Path(d).name) or real(d, **kw))
    write_random_lora(lib / "new", shape=SHAPE, base_name=BASE, seed=99, card=ExpertCard(name="new", description="n"))
    p.add(lib / "new")
    assert checked == ["new"]

    entries = [json.dumps(e) for e in p.entries().values()]
    checked.clear()
    changed = other.adopt(entries)  # strings, as the shared registry holds them
    assert checked == ["new"] and changed == set() and other.version == p.version
    assert json.loads((tmp_path / "other" / "pool.json").read_text())["experts"] == list(p.entries().values())
    checked.clear()
    replaced = {**p.entries()["e3"], "description": "e3, rewritten"}
    changed = other.adopt([json.dumps(replaced) if json.loads(e)["name"] == "e3" else e for e in entries
                           if json.loads(e)["name"] != "e7"])
    assert checked == ["e3"] and changed == {"e3", "e7"} and other.get("e3").card.description == "e3, rewritten"
    assert pool(tmp_path / "other" / "pool.json", [lib], lib).version == other.version  # saved as adopted


def test_version_is_a_content_hash(tmp_path):
    """The same experts give the same version whatever the order of changes; any change gives another."""
    lib = library(tmp_path, names=("a", "b", "c"))
    p = pool(tmp_path / "s1" / "pool.json", [lib], lib)
    q = ExpertPool(state_file=tmp_path / "s2" / "pool.json", roots=[lib.resolve()], base_name=BASE, shape=SHAPE,
                   max_rank=16)
    for name in ("c", "a", "b"):
        q.add(lib / name)
    assert q.version == p.version
    q.remove("a")
    assert q.version != p.version
    q.add(lib / "a")
    assert q.version == p.version
