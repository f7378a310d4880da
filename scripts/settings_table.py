"""The README's configuration table, generated from the settings' own declarations (service/settings.py).

    python scripts/settings_table.py            print the block
    python scripts/settings_table.py --write    rewrite the block between the markers in README.md
    python scripts/settings_table.py --check    exit 1 (printing a diff) when README.md's block differs

One row per field of `service.settings.Settings`, in declaration order: `FLOCK_<NAME>`, its default and its
description. The `# --- group ---` comments of settings.py become sub-headings. Defaults are rendered so the
table does not depend on the machine: paths under the repository root relative to it, paths under flock's cache
directory as `~/.cache/flock/...`, paths under the home directory as `~/...`, empty lists and None as "(empty)".
Nothing here reads the environment: the table shows the declared defaults, whatever FLOCK_* is set to.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import enum
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
START = "<!-- settings:start -->"
END = "<!-- settings:end -->"
EMPTY = "(empty)"
_GROUP = re.compile(r"^#\s*-{3,}\s*(?P<name>.*?)\s*-*\s*$")

if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))


# --- reading the declarations ------------------------------------------------------------------------------


def _field_groups(settings_cls: type) -> dict[str, str]:
    """Field name -> the `# --- group ---` comment above it in the body of the class that declares it (the table
    includes the engine's settings, declared in adapters/engine/settings.py); {} where the source is unreadable."""
    groups: dict[str, str] = {}
    for cls in reversed(settings_cls.__mro__):
        try:
            source = inspect.getsource(sys.modules[cls.__module__])
        except (OSError, TypeError, KeyError):
            continue
        if f"class {cls.__name__}" in source:
            groups.update(groups_from_source(source, cls.__name__))
    return groups


def groups_from_source(source: str, class_name: str = "Settings") -> dict[str, str]:
    """Field name -> group heading, read from the module source: each annotated assignment in the class body
    belongs to the last `# --- name ---` comment line before it."""
    try:
        tree = ast.parse(source)
        comments = [
            (tok.start[0], m.group("name"))
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT and (m := _GROUP.match(tok.string.strip())) and m.group("name")
        ]
    except (SyntaxError, tokenize.TokenError, IndentationError):
        return {}
    cls = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        return {}
    groups: dict[str, str] = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = [name for line, name in comments if cls.lineno <= line < node.lineno]
            if above:
                groups[node.target.id] = above[-1]
    return groups


def _constants(settings_module: Any) -> tuple[Path, Path | None]:
    repo_root = getattr(settings_module, "REPO_ROOT", None) or REPO
    cache = getattr(settings_module, "DEFAULT_CACHE", None)
    return Path(repo_root).resolve(), (Path(cache) if cache is not None else None)


# --- rendering ------------------------------------------------------------------------------------------------


def render_default(value: Any, repo_root: Path = REPO, cache_dir: Path | None = None) -> str:
    """One default as the table shows it (in backticks unless it is empty)."""
    if value is None:
        return EMPTY
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if not value:
            return EMPTY
        return ", ".join(render_default(v, repo_root, cache_dir).strip("`") for v in value).join("``")
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, enum.Enum):
        text = str(value.value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, Path):
        text = _render_path(value, repo_root, cache_dir)
    else:
        text = str(value)
    if text == "":
        return EMPTY
    return f"`{text}`"


def _render_path(path: Path, repo_root: Path, cache_dir: Path | None) -> str:
    bases: list[tuple[Path, str]] = []
    if cache_dir is not None:
        bases.append((cache_dir, "~/.cache/flock"))
    bases += [(repo_root, ""), (Path.home(), "~")]
    for base, shown in bases:
        try:
            rel = path.relative_to(base)
        except ValueError:
            continue
        parts = [p for p in (shown, rel.as_posix()) if p and p != "."]
        return "/".join(parts) or "."
    return path.as_posix()


def _cell(text: str) -> str:
    """One table cell: on one line, `|` escaped, and `<name>` outside code spans kept visible (not read as HTML)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts lie outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _default_of(field: Any) -> Any:
    factory = getattr(field, "default_factory", None)
    if factory is not None:
        try:
            return factory()
        except TypeError:  # a factory taking the validated data (pydantic >= 2.10)
            return None
    default = getattr(field, "default", None)
    if type(default).__name__ == "PydanticUndefinedType":
        return "(required)"
    return default


def generate(settings_cls: type | None = None, source: str | None = None) -> str:
    """The markdown that belongs between the README's markers (without the markers)."""
    if settings_cls is None:
        from service.settings import Settings as settings_cls
    module = sys.modules.get(settings_cls.__module__)
    repo_root, cache_dir = _constants(module)
    prefix = (getattr(settings_cls, "model_config", {}) or {}).get("env_prefix", "FLOCK_")
    groups = groups_from_source(source, settings_cls.__name__) if source is not None else _field_groups(settings_cls)

    sections: list[tuple[str | None, list[str]]] = []
    for name, field in settings_cls.model_fields.items():
        group = groups.get(name)
        if not sections or sections[-1][0] != group:
            sections.append((group, []))
        default = _default_of(field)
        shown = default if default == "(required)" else render_default(default, repo_root, cache_dir)
        description = _cell(getattr(field, "description", None) or "")
        sections[-1][1].append(f"| `{prefix}{name.upper()}` | {_cell(shown)} | {description} |")

    out: list[str] = []
    grouped = any(group is not None for group, _ in sections)
    for group, rows in sections:
        if grouped:  # a field outside any `# --- group ---` (e.g. inherited) goes under "Other"
            group = group or "other"
            out += [f"### {group[:1].upper()}{group[1:]}", ""]
        out += ["| variable | default | what |", "|---|---|---|", *rows, ""]
    return "\n".join(out).strip("\n") + "\n"


# --- the README block -----------------------------------------------------------------------------------------


def readme_block(text: str) -> str:
    """What lies between the markers, blank lines around it removed."""
    try:
        start = text.index(START) + len(START)
        end = text.index(END, start)
    except ValueError:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}") from None
    return text[start:end].strip("\n") + "\n"


def with_block(text: str, block: str) -> str:
    """README text with the block between the markers replaced (blank lines around it, for markdown)."""
    start = text.index(START) + len(START)
    end = text.index(END, start)
    return text[:start] + "\n\n" + block.strip("\n") + "\n\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="rewrite the block in README.md")
    action.add_argument("--check", action="store_true", help="exit 1 when README.md's block is out of date")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)

    block = generate()
    if not (args.write or args.check):
        sys.stdout.write(block)
        return 0
    text = args.readme.read_text()
    current = readme_block(text)
    if args.write:
        if current != block:
            args.readme.write_text(with_block(text, block))
            print(f"{args.readme}: settings table rewritten")
        return 0
    if current == block:
        return 0
    sys.stdout.writelines(difflib.unified_diff(
        current.splitlines(keepends=True), block.splitlines(keepends=True),
        f"{args.readme.name} (settings block)", "generated from service/settings.py"))
    print(f"\n{args.readme}: settings table out of date; run: python scripts/settings_table.py --write")
    return 1


if __name__ == "__main__":
    sys.exit(main())
