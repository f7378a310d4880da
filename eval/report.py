"""results.md (markdown tables) and results.png (matplotlib) from the results dict that harness.run builds."""

from __future__ import annotations

from pathlib import Path


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def fmt_num(x: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def fmt_signed_pp(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f} pp"


def _dist(d: dict[str, float], k: int = 2) -> str:
    return ", ".join(f"{name} {100 * share:.0f}%" for name, share in list(d.items())[:k]) or "–"


def modes_table(modes: dict[str, dict]) -> str:
    rows = ["| mode | held-in mean | held-in, held-out phrasings | % of oracle | held-out mean (vs base) | "
            "routing top-1 | ood abstain | gateway ms p50 | errors |",
            "|---|---|---|---|---|---|---|---|---|"]
    for mode, s in modes.items():
        routing = s.get("routing") or {}
        held_out = fmt_pct(s.get("held_out_mean"))
        if s.get("held_out_vs_base") is not None and mode != "base":
            held_out += f" ({fmt_signed_pp(s['held_out_vs_base'])})"
        pct = s.get("pct_of_oracle")
        rows.append(f"| {mode} | {fmt_pct(s.get('held_in_mean'))} | "
                    f"{fmt_pct(s.get('held_in_mean_test_only_phrasings'))} | {fmt_num(pct, 1, '%')} | {held_out} | "
                    f"{fmt_pct(routing.get('top1_held_in'))} | {fmt_pct(routing.get('ood_abstain'))} | "
                    f"{fmt_num(s.get('gateway_ms_p50'), 2)} | {s.get('errors', 0)} |")
    return "\n".join(rows)


def per_task_table(modes: dict[str, dict], tasks: list[tuple[str, str]]) -> str:
    """Rows = tasks (name, kind), columns = modes: task accuracy."""
    names = list(modes)
    rows = ["| task | kind | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task, kind in tasks:
        cells = [fmt_pct((modes[m].get("accuracy_per_task") or {}).get(task)) for m in names]
        rows.append(f"| {task} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def phrasing_table(summary: dict) -> str:
    """Held-in tasks in one mode: accuracy on training's phrasing families vs families never trained on."""
    split = summary.get("held_in_by_phrasing") or {}
    seen, only = split.get("seen") or {}, split.get("test_only") or {}
    n_seen, n_only = split.get("n_seen") or {}, split.get("n_test_only") or {}
    rows = ["| held-in task | training phrasings | held-out phrasings | all |", "|---|---|---|---|"]
    for task in sorted(set(seen) | set(only)):
        rows.append(f"| {task} | {fmt_pct(seen.get(task))} (n={n_seen.get(task, 0)}) | "
                    f"{fmt_pct(only.get(task))} (n={n_only.get(task, 0)}) | "
                    f"{fmt_pct((summary.get('accuracy_per_task') or {}).get(task))} |")
    return "\n".join(rows)


def variants_table(variants: dict[str, dict]) -> str:
    rows = ["| variant | top-1 held-in | top-1 test-only phrasings | held-in abstain | ood abstain | "
            "held-out routed to | threshold | latency ms p50 |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in variants.items():
        held_out = "; ".join(f"{t}: {_dist(d)}" for t, d in (s.get("held_out_distribution") or {}).items()) or "–"
        rows.append(f"| {name} | {fmt_pct(s.get('top1_held_in'))} | {fmt_pct(s.get('top1_held_in_test_only'))} | "
                    f"{fmt_pct(s.get('held_in_abstain'))} | {fmt_pct(s.get('ood_abstain'))} | {held_out} | "
                    f"{fmt_num(s.get('threshold'), 3)} | {fmt_num(s.get('latency_ms_p50'), 2)} |")
    return "\n".join(rows)


def variants_per_task_table(variants: dict[str, dict]) -> str:
    names = list(variants)
    tasks = sorted({t for s in variants.values() for t in (s.get("top1_per_task") or {})})
    rows = ["| held-in task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        rows.append(f"| {t} | " + " | ".join(fmt_pct((variants[n].get("top1_per_task") or {}).get(t))
                                            for n in names) + " |")
    return "\n".join(rows)


def conversations_table(mechanisms: dict[str, dict]) -> str:
    rows = ["| mechanism | follow-up | follow-up, test-only styles | switch | to a task | to general chat | "
            "route ms p95 |", "|---|---|---|---|---|---|---|"]
    for name, s in mechanisms.items():
        rows.append(f"| {name} | {fmt_pct(s.get('follow_up'))} | {fmt_pct(s.get('follow_up_test_only_styles'))} | "
                    f"{fmt_pct(s.get('switch'))} | {fmt_pct(s.get('switch_task'))} | {fmt_pct(s.get('switch_ood'))} | "
                    f"{fmt_num(s.get('route_ms_p95'), 2)} |")
    return "\n".join(rows)


def long_prompts_table(long: dict) -> str:
    tail = long.get("served_tail_chars")
    cols = ["whole text (head 256 word pieces)", f"tail {tail}", f"tail {tail} + last sentence"]
    rows = ["| layout | context chars | " + " | ".join(cols) + " | served (Router.route, typos repaired) | "
            "served route ms p50 / p95 | whole text embed ms |",
            "|---|---|" + "---|" * len(cols) + "---|---|---|"]
    for layout, by_size in long.get("by_layout", {}).items():
        for size, row in by_size.items():
            cells = []
            for c in cols:
                v = row.get(c) or {}
                cells.append(f"{fmt_pct(v.get('top1_held_in'))} / {fmt_pct(v.get('ood_abstain'))}")
            served = row.get("served") or {}
            cells.append(f"{fmt_pct(served.get('top1_held_in'))} / {fmt_pct(served.get('ood_abstain'))}")
            rows.append(f"| {layout} | {size} | " + " | ".join(cells) +
                        f" | {fmt_num(served.get('route_ms_p50'), 1)} / {fmt_num(served.get('route_ms_p95'), 1)} | "
                        f"{fmt_num(served.get('whole_text_embed_ms_p50'), 1)} |")
    return "\n".join(rows)


def _glider_defaults(defaults: dict) -> str:
    margin = defaults.get("solo_margin")
    return (f"glider without parameters: α {defaults['alpha']:g}, "
            + ("always mixing. " if margin is None else f"solo margin {margin:g}. "))


def render_markdown(results: dict) -> str:
    cfg = results.get("config", {})
    parts = ["# flock eval", ""]
    parts.append(f"{cfg.get('n_per_task', '?')} test-split examples per task (seed {cfg.get('seed', '?')}), "
                 f"{len(cfg.get('experts') or [])} experts in the pool ({cfg.get('library', '?')}). "
                 + (f"vLLM dtype {cfg['vllm_dtype']}. " if cfg.get("vllm_dtype") else "")
                 + (_glider_defaults(cfg["glider_defaults"]) if cfg.get("glider_defaults") else "")
                 + f"{cfg.get('date', '')}")
    modes = results.get("modes") or {}
    if modes:
        parts += ["", "## Task accuracy by mode (through the gateway)", "",
                  "held-in/held-out means are macro means over tasks; % of oracle = held-in mean / oracle held-in "
                  "mean; routing top-1 = the response's top expert is the task's own expert (held-in prompts); "
                  "ood abstain = ood prompts answered by the base model; gateway ms = x-flock-gateway-ms "
                  "(routing and adapter choice before forwarding).", "", modes_table(modes)]
        tasks = [(t, k) for t, k in (results.get("tasks") or []) if k != "ood"]
        parts += ["", "### Per-task accuracy", "", per_task_table(modes, tasks)]
        oracle = modes.get("oracle") or {}
        if (oracle.get("held_in_by_phrasing") or {}).get("seen"):
            parts += ["", "### Held-in tasks by phrasing family (oracle)", "",
                      "Each expert on its own test items, in the phrasing families its training used and in families "
                      "kept out of training (eval/testset.py's test-only phrasings).", "",
                      phrasing_table(oracle)]
    for mode, why in (results.get("skipped_modes") or {}).items():
        parts.append(f"\nmode `{mode}` skipped: {why}")
    routing = results.get("routing") or {}
    variants = routing.get("variants") or {}
    if variants:
        parts += ["", "## Routing variants (in process, no generation)", "",
                  "Same test prompts; each variant's abstain threshold is calibrated on the cards' examples vs "
                  "router/calibration.py's out-of-domain prompts. Latency = query embedding + scoring "
                  "(+ the LLM call for glider).", "", variants_table(variants), "",
                  "### Top-1 by held-in task", "", variants_per_task_table(variants), ""]
        for name, s in variants.items():
            parts.append(f"- **{name}**: {s.get('note', '')}")
    for name, why in (routing.get("skipped") or {}).items():
        parts.append(f"- **{name}** skipped: {why}")
    conv = routing.get("conversations")
    if conv:
        parts += ["", "## Multi-turn conversations (in process)", "",
                  f"{conv['n_conversations']} seeded {conv['split']} conversations ({conv['turns']} user turns, 2-4 "
                  "each; eval/conversations.py), every turn routed through Router.route with the user turns before "
                  "it. Follow-up: a fragment naming no task must keep the conversation's expert; switch: a new task "
                  "prompt must get its expert, a general prompt the base model.", "",
                  conversations_table(conv["mechanisms"])]
        cost = conv.get("history_cost") or {}
        if cost:
            parts.append("\nRouter.route ms p50 / p95 on the last turn of 3-4-turn chats: " + "; ".join(
                f"{k} {fmt_num(v['p50'], 2)} / {fmt_num(v['p95'], 2)}" for k, v in cost.items()) +
                " (single: the last message alone; warm: earlier turns seen by this replica; cold: every turn "
                "embedded, in one micro-batch).")
        if conv.get("fit_on_dev"):
            parts.append(f"\nFollow-up test refitted on dev conversations: `{conv['fit_on_dev']}`; served: "
                         f"`{conv.get('served')}`.")
    long = routing.get("long_prompts")
    if long:
        parts += ["", "## Long prompts (in process)", "",
                  f"{long['n_per_task']} test prompts per held-in task and general prompts after unrelated context; "
                  "top-1 held-in / general prompts to the base model; routing time = Router.route, no cache.", "",
                  long_prompts_table(long)]
    st = routing.get("styles")
    if st:
        parts += ["", "## Unseen styles and abstain calibrations (in process)", "",
                  f"{st['n_per_task']} prompts per held-in task and {2 * st['n_per_task']} general prompts, wrapped in "
                  "styles no card shows (eval/styles.py); fitted calibrations fitted on the dev set (other wrappers, "
                  "dev items), never on test. Top-1 held-in / general prompts to the base model.", "",
                  "| calibration | dev | test |", "|---|---|---|"]
        for name, row in st["methods"].items():
            parts.append(f"| {name} | {fmt_pct(row['dev']['top1_held_in'])} / {fmt_pct(row['dev']['ood_abstain'])} | "
                         f"{fmt_pct(row['test']['top1_held_in'])} / {fmt_pct(row['test']['ood_abstain'])} |")
    return "\n".join(parts).rstrip() + "\n"


def plot(results: dict, path: Path) -> bool:
    """Per-task accuracy bars by mode (and per-task routing top-1 by variant); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return False
    modes = results.get("modes") or {}
    variants = (results.get("routing") or {}).get("variants") or {}
    panels = [p for p in ("modes", "variants") if (modes if p == "modes" else variants)]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.5 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        if panel == "modes":
            tasks = [t for t, k in (results.get("tasks") or []) if k != "ood"]
            series = {m: [(s.get("accuracy_per_task") or {}).get(t) or 0.0 for t in tasks] for m, s in modes.items()}
            title, ylabel = "task accuracy by mode", "accuracy"
        else:
            tasks = sorted({t for s in variants.values() for t in (s.get("top1_per_task") or {})})
            series = {v: [(s.get("top1_per_task") or {}).get(t) or 0.0 for t in tasks] for v, s in variants.items()}
            title, ylabel = "routing top-1 by held-in task, per router variant", "top-1"
        x = np.arange(len(tasks))
        width = 0.8 / max(1, len(series))
        for i, (label, values) in enumerate(series.items()):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(tasks, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(ncol=min(6, len(series)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
