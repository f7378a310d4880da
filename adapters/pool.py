"""The expert pool: validated adapters with their cards, persisted so that it survives a restart."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from adapters.card import ExpertCard, read_card
from adapters.errors import ExpertExists, InvalidExpert, PoolError, StateNotWritable, UnknownExpert
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

    @property
    def name(self) -> str:
        return self.card.name

    def to_json(self) -> dict:
        return {"path": str(self.path), "rank": self.rank, "target_modules": list(self.target_modules),
                **self.card.model_dump()}


class ExpertPool:
    """Thread-safe registry. `version` is a content hash: any change to the pool changes it."""

    def __init__(self, *, state_file: Path, roots: list[Path], base_name: str, shape: ModelShape, max_rank: int):
        self._state_file = state_file
        self._roots = roots
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

    def get(self, name: str) -> Expert | None:
        return self._experts.get(name)

    def experts(self) -> list[Expert]:
        return sorted(self._experts.values(), key=lambda e: e.name)

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
                with safe_open(str(gates), framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
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
    def check(self, path: str | Path, card: ExpertCard | None = None) -> Expert:
        """Validate without registering: raises a PoolError that says what is wrong."""
        adapter_dir = resolve_inside(path, self._roots)
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
        return Expert(card=card, path=adapter_dir, rank=config["r"], target_modules=tuple(sorted(targets)))

    def add(self, path: str | Path, card: ExpertCard | None = None, *, replace: bool = False) -> Expert:
        expert = self.check(path, card)
        if expert.name == self._base_name:
            raise InvalidExpert(f"{expert.name!r} is the base model's name", "name")
        with self._lock:
            if expert.name in self._experts and not replace:
                raise ExpertExists(f"expert {expert.name!r} is already registered", "name")
            experts = {**self._experts, expert.name: expert}
            self._commit(experts)
        log.info("registered expert %s from %s", expert.name, expert.path)
        return expert

    def remove(self, name: str) -> Expert:
        with self._lock:
            expert = self._experts.get(name)
            if expert is None:
                raise UnknownExpert(f"no expert named {name!r}", "name")
            self._commit({k: v for k, v in self._experts.items() if k != name})
        log.info("removed expert %s", name)
        return expert

    # --- persistence ----------------------------------------------------------------------------------
    def load(self, seed_dir: Path | None = None) -> None:
        """Read the saved pool; on first start, seed it from the default library directory."""
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
            current = self._experts.get(entry.get("name"))
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
                card = ExpertCard.model_validate({k: entry[k] for k in ("name", "description", "examples", "extra")
                                                  if k in entry})
                try:
                    expert = self.check(entry["path"], card)
                except PoolError:
                    moved = self._library_copy(entry["path"], library)
                    if moved is None:
                        raise
                    expert = self.check(moved, card)
                    log.warning("stored expert %s: %s is not usable here; using the library's %s",
                                expert.name, entry["path"], moved)
            except Exception as exc:  # a stored expert whose files went away must not stop the service
                log.warning("dropping stored expert %s: %s", entry.get("name"), exc)
                continue
            experts[expert.name] = expert
        return experts

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
            fields = json.dumps([expert.name, str(expert.path), mtime, expert.card.description])
            digest = int.from_bytes(hashlib.sha256(fields.encode()).digest()[:8], "big")
            known = self._encodings[expert.name] = (expert, json.dumps(expert.to_json()), digest)
        return known[1], known[2]

    def _fingerprint(self, experts: dict[str, Expert] | None = None) -> str:
        """The pool's content hash: the XOR of its experts' fingerprints (name, path, weights' mtime,
        description), so that it is updated per changed expert and does not depend on order."""
        experts = self._experts if experts is None else experts
        value = 0
        for e in experts.values():
            value ^= self._encoded(e)[1]
        return f"{value:016x}"
