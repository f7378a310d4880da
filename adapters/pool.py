"""The expert pool: validated adapters with their cards, persisted so that it survives a restart."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from adapters.card import ExpertCard, read_card
from adapters.errors import (
    ExpertExists,
    ForbiddenPath,
    InvalidExpert,
    NameNotAllowed,
    NotPermitted,
    PoolError,
    StateNotWritable,
    UnknownExpert,
)
from adapters.safetensors_io import read_tensors
from adapters.tenants import EVERYTHING, Scope, name_prefix
from adapters.validate import ModelShape, resolve_inside, validate_adapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quarantine:
    """An expert left out of routing and composites: why, and its files as they were when found broken."""

    reason: str
    files: tuple


def files_fingerprint(path: Path) -> tuple:
    """(name, size, mtime) of an adapter directory's files: a change of any of them is worth checking again."""
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))
    except OSError:
        return ()


@dataclass(frozen=True)
class Expert:
    card: ExpertCard
    path: Path
    rank: int
    target_modules: tuple[str, ...]
    tenant: str | None = None  # the owner: None is a shared expert (adapters/tenants.py)

    @property
    def name(self) -> str:
        return self.card.name

    def to_json(self) -> dict:
        return {"path": str(self.path), "rank": self.rank, "target_modules": list(self.target_modules),
                "tenant": self.tenant, **self.card.model_dump()}


class ExpertPool:
    """Thread-safe registry. `version` is a content hash: any change to the pool changes it."""

    def __init__(self, *, state_file: Path, roots: list[Path], base_name: str, shape: ModelShape, max_rank: int,
                 tenants_dir: Path | None = None):
        self._state_file = state_file
        self._roots = roots
        # <state>/experts: a tenant's experts live in <tenants_dir>/<tenant>/ and nowhere else.
        self._tenants_dir = (tenants_dir or state_file.parent / "experts").expanduser().resolve()
        self._base_name = base_name
        self._shape = shape
        self._max_rank = max_rank
        self._lock = threading.Lock()
        self._experts: dict[str, Expert] = {}
        self._encodings: dict[str, tuple[Expert, str, int]] = {}  # name -> (expert, entry JSON, fingerprint)
        self.version = self._fingerprint()
        # Health is this process's own finding, not part of the registry: never saved nor shared.
        self.quarantined: dict[str, Quarantine] = {}

    # --- reading --------------------------------------------------------------------------------------
    @property
    def roots(self) -> list[Path]:
        return list(self._roots)

    def roots_for(self, tenant: str | None) -> list[Path]:
        """Where experts of `tenant` may be registered from: the expert roots (and admin uploads) for shared
        experts, the tenant's own directory for a tenant's."""
        return [*self._roots, self.upload_dir(None)] if tenant is None else [self._tenants_dir / tenant]

    def upload_dir(self, tenant: str | None) -> Path:
        """Where uploads of `tenant`'s experts are unpacked; shared ones in '_shared' (no tenant's name: a
        tenant name starts with a letter or digit)."""
        return self._tenants_dir / (tenant or "_shared")

    def get(self, name: str) -> Expert | None:
        return self._experts.get(name)

    def visible(self, name: str, scope: Scope) -> Expert | None:
        """The expert `name` if `scope` may see it; None as for a name that does not exist."""
        expert = self._experts.get(name)
        return expert if expert is not None and scope.sees(expert.tenant) else None

    def experts(self, scope: Scope = EVERYTHING) -> list[Expert]:
        return sorted((e for e in self._experts.values() if scope.sees(e.tenant)), key=lambda e: e.name)

    def version_of(self, experts: list[Expert]) -> str:
        """A content hash of some experts (a visible set): what the decisions over them depend on."""
        return self._fingerprint({e.name: e for e in experts})

    def servable(self) -> list[Expert]:
        """The experts routing and composites may use: registered and not quarantined."""
        return [e for e in self.experts() if e.name not in self.quarantined]

    @property
    def health_version(self) -> str:
        """Changes whenever the quarantined set does (routing decisions depend on it)."""
        return hashlib.sha256(",".join(sorted(self.quarantined)).encode()).hexdigest()[:8]

    # --- health ---------------------------------------------------------------------------------------
    def problem(self, expert: Expert) -> str | None:
        """What is wrong with an expert's files now (None: nothing): adapter, config and gate files read back."""
        try:
            self.check(expert.path, expert.card)
            gates = expert.path / "gates.safetensors"
            if gates.is_file():
                read_tensors(gates)
        except PoolError as exc:
            return exc.message
        except Exception as exc:  # safetensors raises several unrelated types on corrupt files
            return f"gates.safetensors is unreadable: {exc}"
        return None

    def quarantine_if_broken(self, name: str) -> bool:
        """Check an expert's files; quarantine it (logged once, with the reason) if they are broken."""
        expert = self._experts.get(name)
        if expert is None or name in self.quarantined:
            return name in self.quarantined
        reason = self.problem(expert)
        if reason is None:
            return False
        self.quarantined[name] = Quarantine(reason, files_fingerprint(expert.path))
        log.error("expert %s quarantined: %s (left out of routing until its files change or an admin checks it)",
                  name, reason)
        return True

    def recheck(self, force: bool = False) -> list[str]:
        """Check quarantined experts again (those whose files changed, or all with `force`); returns the names
        released."""
        released = []
        for name, q in list(self.quarantined.items()):
            expert = self._experts.get(name)
            if expert is None:
                del self.quarantined[name]
                continue
            if not force and files_fingerprint(expert.path) == q.files:
                continue
            reason = self.problem(expert)
            if reason is None:
                del self.quarantined[name]
                released.append(name)
                log.info("expert %s is healthy again and back in the pool", name)
            else:
                self.quarantined[name] = Quarantine(reason, files_fingerprint(expert.path))
        return released

    def __len__(self) -> int:
        return len(self._experts)

    # --- changing -------------------------------------------------------------------------------------
    def check(self, path: str | Path, card: ExpertCard | None = None, tenant: str | None = None) -> Expert:
        """Validate without registering: raises a PoolError that says what is wrong."""
        adapter_dir = self.resolve_path(path, tenant)
        config = validate_adapter(adapter_dir, base_name=self._base_name, shape=self._shape, max_rank=self._max_rank)
        if card is None:
            try:
                card = read_card(adapter_dir)
            except ValueError as exc:
                raise InvalidExpert(f"card.json is invalid: {exc}", "path") from None
            if card is None:
                raise InvalidExpert("no expert card given and no card.json in the adapter directory", "name")
        targets = config.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        return Expert(card=card, path=adapter_dir, rank=config["r"], target_modules=tuple(sorted(targets)),
                      tenant=tenant)

    def resolve_path(self, path: str | Path, tenant: str | None = None) -> Path:
        """The adapter directory, symlinks resolved, inside the roots `tenant` may use. A tenant's directory
        may hold no link leading out of it either (to another tenant's weights, say)."""
        roots = self.roots_for(tenant)
        try:
            adapter_dir = resolve_inside(path, roots)
        except ForbiddenPath:
            if tenant is None:
                raise
            raise ForbiddenPath(f"expert path {str(path)!r} is outside tenant {tenant!r}'s expert directory "
                                f"{roots[0]}/: a tenant's experts are registered from there (or uploaded)",
                                "path") from None
        if tenant is not None and adapter_dir.is_dir():
            for f in adapter_dir.iterdir():
                if f.is_symlink() and not f.resolve().is_relative_to(roots[0]):
                    raise ForbiddenPath(f"{f.name} in {str(path)!r} links outside tenant {tenant!r}'s expert "
                                        "directory", "path")
        return adapter_dir

    def add(self, path: str | Path, card: ExpertCard | None = None, *, replace: bool = False,
            tenant: str | None = None, scope: Scope = EVERYTHING) -> Expert:
        """Register an expert owned by `tenant` (None: shared) on behalf of a caller who sees `scope`."""
        if not scope.manages(tenant):
            raise NotPermitted("shared experts are registered by admin keys; a tenant key registers its "
                               "tenant's own" if tenant is None else f"this key may not register experts of "
                               f"tenant {tenant!r}", "tenant")
        expert = self.check(path, card, tenant)
        name = expert.name
        if name == self._base_name:
            raise InvalidExpert(f"{name!r} is the base model's name", "name")
        if tenant is not None and not name.startswith(name_prefix(tenant)):
            if replace and not scope.everything:  # the same answer as for any name this caller cannot see
                raise UnknownExpert(f"no expert named {name!r}", "name")
            raise NameNotAllowed(f"the names of tenant {tenant!r}'s experts start with {name_prefix(tenant)!r}: "
                                 f"{name!r} does not", "name")
        with self._lock:
            existing = self._experts.get(name)
            if existing is not None and not scope.sees(existing.tenant):  # not reachable by the naming rule
                raise UnknownExpert(f"no expert named {name!r}", "name") if replace else \
                    ExpertExists(f"expert name {name!r} is not available", "name")
            if existing is not None and not replace:
                raise ExpertExists(f"expert {name!r} is already registered", "name")
            if existing is not None and not scope.manages(existing.tenant):
                raise NotPermitted(f"expert {name!r} is shared: only admin keys replace it", "name")
            if existing is not None and existing.tenant != tenant:
                raise ExpertExists(f"expert {name!r} belongs to {_owner(existing.tenant)}, not {_owner(tenant)}: "
                                   "remove it first to change its owner", "tenant")
            experts = {**self._experts, name: expert}
            self._commit(experts)
        log.info("registered expert %s (%s) from %s", name, _owner(tenant), expert.path)
        return expert

    def remove(self, name: str, scope: Scope = EVERYTHING) -> Expert:
        """Remove `name` on behalf of a caller who sees `scope`: an expert it cannot see is 'no expert'."""
        with self._lock:
            expert = self._experts.get(name)
            if expert is None or not scope.sees(expert.tenant):
                raise UnknownExpert(f"no expert named {name!r}", "name")
            if not scope.manages(expert.tenant):
                raise NotPermitted(f"expert {name!r} is shared: only admin keys remove it", "name")
            self._commit({k: v for k, v in self._experts.items() if k != name})
        log.info("removed expert %s", name)
        return expert

    # --- persistence ----------------------------------------------------------------------------------
    def load(self, seed_dir: Path | None = None) -> None:
        """Read the saved pool; on first start, seed it from the default library directory."""
        for stale in self._state_file.parent.glob(self._state_file.stem + ".tmp*"):
            stale.unlink(missing_ok=True)  # a write a crash cut short (the state file itself is whole)
        if self._state_file.is_file():
            saved = json.loads(self._state_file.read_text())
            experts = self._from_entries(saved.get("experts", []), library=seed_dir)
            stored = {entry.get("name"): entry.get("path") for entry in saved.get("experts", [])}
            with self._lock:
                if any(str(e.path) != stored[name] for name, e in experts.items()):
                    self._commit(experts)  # library experts re-pointed: save the paths that resolve here
                else:
                    self._experts = experts
                    self.version = self._fingerprint()
            return
        experts = {}
        if seed_dir is not None and seed_dir.is_dir():
            for sub in sorted(p for p in seed_dir.iterdir() if (p / "card.json").is_file()):
                try:
                    expert = self.check(sub)
                except Exception as exc:
                    log.warning("skipping library adapter %s: %s", sub.name, exc)
                    continue
                experts[expert.name] = expert
        with self._lock:
            self._commit(experts)

    def entries(self) -> dict[str, dict]:
        """Every expert as the JSON entry the state file (and the shared registry) stores."""
        return {e.name: e.to_json() for e in self.experts()}

    def adopt(self, entries: list[dict] | list[str]) -> set[str]:
        """Make the pool exactly `entries` (another replica's view: dicts, or their JSON text as the shared
        registry holds it); returns the names that were removed or changed, whose adapters backends must drop.
        Entries that fail validation here are left out. An entry identical to the expert this pool already has
        is kept without validating its files again: adopting a change costs O(change), not O(pool)."""
        unchanged: dict[str, Expert] = {}
        fresh: list[dict] = []
        for raw in entries:
            entry = json.loads(raw) if isinstance(raw, str) else raw
            current = self._experts.get(entry.get("name") or "")
            if current is not None and (raw if isinstance(raw, str) else json.dumps(raw)) == self._encoded(current)[0]:
                unchanged[current.name] = current
            else:
                fresh.append(entry)
        experts = {**unchanged, **self._from_entries(fresh)}
        with self._lock:
            old = self._experts
            changed = {n for n, e in old.items() if n not in experts or experts[n] != e}
            if changed or set(experts) != set(old):
                self._commit(experts)
        return changed

    def _from_entries(self, entries: list[dict], library: Path | None = None) -> dict[str, Expert]:
        """Stored entries that still validate. A library expert whose stored path is gone or outside this
        deployment's roots (the state was written by another checkout of the repository, since deleted or
        moved) is taken from `library` when the library has an adapter of the same directory name."""
        experts = {}
        for entry in entries:
            try:
                card = _stored_card(entry)
                tenant = entry.get("tenant")
                if tenant is not None and not card.name.startswith(name_prefix(tenant)):
                    raise NameNotAllowed(f"not named {name_prefix(tenant)}...", "name")
                try:
                    expert = self.check(entry["path"], card, tenant)
                except PoolError:
                    moved = self._library_copy(entry["path"], library) if tenant is None else None
                    if moved is None:
                        raise
                    expert = self.check(moved, card)
                    log.warning("stored expert %s: %s is not usable here; using the library's %s",
                                expert.name, entry["path"], moved)
            except Exception as exc:  # a stored expert whose files went away must not stop the service
                kept = self._quarantined_entry(entry, exc)
                if kept is None:
                    log.warning("dropping stored expert %s: %s", entry.get("name"), exc)
                    continue
                expert = kept
            experts[expert.name] = expert
        return experts

    def _quarantined_entry(self, entry: dict, exc: Exception) -> Expert | None:
        """A stored expert whose directory is still there but whose files are broken (being rewritten, or
        corrupt) stays registered, quarantined: dropping it would remove it from every replica's pool for good.
        None when its directory is gone or the entry itself is unusable."""
        try:
            card = _stored_card(entry)
            tenant = entry.get("tenant")
            if isinstance(exc, NameNotAllowed):  # an entry no tenant may hold: never kept
                return None
            path = self.resolve_path(entry["path"], tenant)
            expert = Expert(card=card, path=path, rank=int(entry["rank"]),
                            target_modules=tuple(entry.get("target_modules") or ()), tenant=tenant)
        except Exception:
            return None
        if not path.is_dir():
            return None
        reason = exc.message if isinstance(exc, PoolError) else str(exc)
        if expert.name not in self.quarantined:
            log.error("expert %s quarantined: %s (left out of routing until its files change or an admin checks it)",
                      expert.name, reason)
        self.quarantined[expert.name] = Quarantine(reason, files_fingerprint(path))
        return expert

    @staticmethod
    def _library_copy(stored: str, library: Path | None) -> Path | None:
        """The same expert in this checkout's library: a directory of the same name in a directory named like
        the library, whose card carries the same expert name (never another expert under a stored name)."""
        old = Path(stored)
        if library is None or old.parent.name != library.name:
            return None
        candidate = library / old.name
        try:
            card = read_card(candidate)
        except ValueError:
            return None
        if card is None or card.name != old.name or candidate.resolve() == old.resolve():
            return None
        return candidate

    def _commit(self, experts: dict[str, Expert]) -> None:
        # Write first, then swap: a failed write leaves both the file and the in-memory pool unchanged.
        # Each expert's entry is encoded and fingerprinted once (kept by the Expert object): a change costs the
        # changed experts' encoding plus writing the joined text, not encoding the whole pool again.
        version = self._fingerprint(experts)
        ordered = sorted(experts.values(), key=lambda e: e.name)
        text = ('{\n "version": ' + json.dumps(version) + ',\n "experts": [\n'
                + ",\n".join("  " + self._encoded(e)[0] for e in ordered) + "\n ]\n}")
        tmp = self._state_file.with_suffix(f".tmp{os.getpid()}")
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # on disk before it replaces the old file: a crash leaves one or the other
            os.replace(tmp, self._state_file)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StateNotWritable(f"the pool's state file {self._state_file} cannot be written ({exc.strerror or exc})"
                                   "; the pool is unchanged") from None
        self._experts = experts
        self.version = version
        for name in [n for n in self._encodings if n not in experts]:
            del self._encodings[name]

    def _encoded(self, expert: Expert) -> tuple[str, int]:
        """(the expert's state-file entry as JSON text, its fingerprint as an int), made once per Expert."""
        known = self._encodings.get(expert.name)
        if known is None or known[0] is not expert:
            weights = expert.path / "adapter_model.safetensors"
            mtime = weights.stat().st_mtime_ns if weights.exists() else 0
            fields = json.dumps([expert.name, str(expert.path), mtime, expert.card.description, expert.tenant])
            digest = int.from_bytes(hashlib.sha256(fields.encode()).digest()[:8], "big")
            known = self._encodings[expert.name] = (expert, json.dumps(expert.to_json()), digest)
        return known[1], known[2]

    def _fingerprint(self, experts: dict[str, Expert] | None = None) -> str:
        """The pool's content hash: the XOR of its experts' fingerprints (name, path, weights' mtime,
        description, owner), so that it is updated per changed expert and does not depend on order."""
        experts = self._experts if experts is None else experts
        value = 0
        for e in experts.values():
            value ^= self._encoded(e)[1]
        return f"{value:016x}"


def _stored_card(entry: dict) -> ExpertCard:
    """The card fields of a stored pool entry."""
    return ExpertCard.model_validate({k: entry[k] for k in ("name", "description", "examples", "extra") if k in entry})


def _owner(tenant: str | None) -> str:
    return "the shared pool" if tenant is None else f"tenant {tenant!r}"
