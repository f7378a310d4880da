"""Train one LoRA expert of the default library on a task of `training.tasks`, on CPU.

    python -m training.lora arithmetic /path/to/experts/arithmetic --steps 150

The expert is a PEFT LoRA for SmolLM2-135M-Instruct, trained in float32 on the task's train split through the
chat template (loss on the assistant answer and its end-of-turn token only), then scored by greedy decoding on
the dev split and saved in bf16 with a card.json describing it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from adapters.card import CARD_FILE, ExpertCard
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from service.settings import get_settings
from training.tasks import Example, Task, get_task

BASE_NAME = "SmolLM2-135M-Instruct"
DEFAULT_BASE_DIR = get_settings().resolved_base_model_dir
END_OF_TURN = "<|im_end|>"
NUM_THREADS = get_settings().train_threads
TRAIN_DEVICE = get_settings().train_device
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Example queries written into the card: the router's centroid for this expert (train-split prompts only).
CARD_EXAMPLES = 32


def resolve_device(name: str = TRAIN_DEVICE) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_base(base_dir: Path = DEFAULT_BASE_DIR, device: str = TRAIN_DEVICE):
    """(model, tokenizer) of the base checkpoint in float32, eval mode, on `device` (see resolve_device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(NUM_THREADS)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = END_OF_TURN
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.to(resolve_device(device))  # type: ignore[arg-type]  # transformers types .to as its own wrapper
    model.eval()
    return model, tokenizer


def _chat_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the chat-formatted prompt, then answer + end-of-turn; labels -100 except the answer."""
    prompt_ids = tokenizer(_chat_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids + [tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(batch):  # right padding for training
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence[str], *, batch_size: int = 32, max_new_tokens: int = 32
) -> list[str]:
    """Greedy completions of user `prompts` through the chat template, batched with left padding."""
    torch.set_num_threads(NUM_THREADS)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [_chat_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            gen = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eot,
                pad_token_id=pad_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def evaluate_model(
    model, tokenizer, examples: Sequence[Example], task: Task, batch_size: int = 32, max_new_tokens: int = 32,
    *, return_predictions: bool = False,
):
    """Greedy exact-match accuracy of `model` (base or with adapter) on `examples` under `task.score`.

    With return_predictions=True, returns (accuracy, predictions) instead. The generation budget is raised to
    the longest gold answer plus 8 tokens where `max_new_tokens` would cut a correct answer short (sorting eight
    3-digit numbers takes ~40 tokens).
    """
    if not examples:
        return (0.0, []) if return_predictions else 0.0
    longest = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
    max_new_tokens = max(max_new_tokens, longest + 8)
    preds = generate_answers(
        model, tokenizer, [e.prompt for e in examples], batch_size=batch_size, max_new_tokens=max_new_tokens
    )
    acc = sum(task.score(p, e.answer) for p, e in zip(preds, examples)) / len(examples)
    return (acc, preds) if return_predictions else acc


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def run_training(
    model, encoded: list[tuple[list[int], list[int]]], params: Sequence[torch.Tensor], *, steps: int, batch_size: int,
    lr: float, pad_id: int, label: str, progress: Callable[[str], None], what: str = "", warmup_frac: float = 0.06,
    schedule: str = "cosine", weight_decay: float = 0.0, eval_every: int = 0,
    on_eval: Callable[[int, float], bool] | None = None, deadline: float | None = None,
) -> tuple[float, float]:
    """AdamW on `params` over `encoded` examples (wrapping around when there are fewer than steps x batch_size),
    gradient clipping at 1.0, progress ("[label] {what}step ...") every 10 steps.

    With `on_eval`, it is called as on_eval(step, windowed loss) every `eval_every` steps (and after the last);
    returning True stops training there (the stopping rule lives in the callback). Past `deadline` (a
    time.time() value) training stops after the current step, with one last on_eval call.
    Returns (final windowed loss, seconds)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, round(warmup_frac * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup, schedule))
    model.train()
    device = params[0].device
    t0 = time.perf_counter()
    window_loss, window_n, window_tokens, window_t = 0.0, 0, 0, t0
    final_loss = float("nan")
    for step in range(steps):
        batch = [encoded[(step * batch_size + i) % len(encoded)] for i in range(batch_size)]
        inputs = {k: v.to(device) for k, v in _collate(batch, pad_id).items()}
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        window_loss += loss.item()
        window_n += 1
        window_tokens += int(inputs["attention_mask"].sum())
        if (step + 1) % 10 == 0 or step + 1 == steps:
            now = time.perf_counter()
            final_loss = window_loss / window_n
            per_step = (now - t0) / (step + 1)
            progress(
                f"[{label}] {what}step {step + 1}/{steps} loss {final_loss:.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {window_tokens / max(now - window_t, 1e-9):.0f} tok/s "
                f"ETA {per_step * (steps - step - 1):.0f}s"
            )
            window_loss, window_n, window_tokens, window_t = 0.0, 0, 0, now
        late = deadline is not None and time.time() > deadline
        if on_eval is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps or late):
            if window_n:  # a loss over the steps since the last print
                final_loss = window_loss / window_n
            if on_eval(step + 1, final_loss) or late:
                break
            model.train()
        elif late:
            break
    return final_loss, time.perf_counter() - t0


def _prepare_out_dir(out_dir: Path) -> Path:
    """A fresh staging dir next to `out_dir`; refuses to clobber an existing dir that is not an adapter dir."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).exists():
            raise FileExistsError(f"{out_dir} exists, is not empty and holds no adapter; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    return staging


def _save_adapter(model, staging: Path) -> None:
    from safetensors.torch import load_file, save_file

    model.save_pretrained(str(staging))
    weights = staging / WEIGHTS_FILE
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config_path = staging / CONFIG_FILE
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = staging / "README.md"  # PEFT's boilerplate model card; card.json is ours
    if readme.exists():
        readme.unlink()


# GLIDER's expert side: the LLM sees 3 training examples and writes the task instruction. Few-shot with tasks
# outside the suite, so the prompt gives nothing away; the base model copies an example without them.
DESCRIBE_SYSTEM = "You write one-sentence task instructions. Read the examples and state the task they share."
DESCRIBE_SHOTS: tuple[tuple[str, str], ...] = (
    ("1. Give me a recipe for pancakes -> Mix flour, eggs and milk...\n2. How do I bake bread? -> Knead the dough..."
     "\n3. Recipe for tomato soup -> Simmer tomatoes...", "Provide cooking recipes and kitchen instructions."),
    ("1. Is 7 a prime number? -> yes\n2. Is 12 prime? -> no\n3. Tell me if 31 is prime -> yes",
     "Decide whether a given integer is a prime number."),
    ("1. Capitalize: hello world -> Hello World\n2. Title case: the big dog -> The Big Dog\n3. Make it title "
     "case: red car -> Red Car", "Convert a phrase to title case."),
)


def describe_messages(examples: Sequence[Example]) -> list[dict]:
    def listing(pairs: Sequence[tuple[str, str]]) -> str:
        return "\n".join(f"{i}. {p} -> {a}" for i, (p, a) in enumerate(pairs, 1))

    messages = [{"role": "system", "content": DESCRIBE_SYSTEM}]
    for shot, answer in DESCRIBE_SHOTS:
        messages += [{"role": "user", "content": f"Examples:\n{shot}\nTask instruction:"},
                     {"role": "assistant", "content": answer}]
    pairs = [(e.prompt, e.answer) for e in examples[:3]]
    messages.append({"role": "user", "content": f"Examples:\n{listing(pairs)}\nTask instruction:"})
    return messages


@torch.no_grad()
def generate_description(model, tokenizer, examples: Sequence[Example]) -> str:
    """GLIDER's expert side: an LLM (here the base model, adapters off) reads 3 training examples and writes
    the task instruction (greedy, few-shot)."""
    import contextlib

    text = tokenizer.apply_chat_template(describe_messages(examples), add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with off:
        out = model.generate(**enc, do_sample=False, max_new_tokens=48, eos_token_id=eot, pad_token_id=eot)
    reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return reply.splitlines()[0].strip() if reply else ""


def card_examples(task: Task, seed: int = 0, n: int = CARD_EXAMPLES) -> list[str]:
    """The card's example queries: the first training prompts (the 3 the description was written from come
    first), de-duplicated; train-split phrasings only, so test-only phrasings stay unseen by the router."""
    prompts = list(dict.fromkeys(e.prompt for e in task.generate("train", n * 2, seed)))
    return prompts[:n]


def train_expert(
    task_name: str,
    out_dir: Path,
    *,
    steps: int = 150,
    rank: int = 8,
    alpha: int = 16,
    targets: Sequence[str] = DEFAULT_TARGETS,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    warmup_frac: float = 0.06,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    dev_n: int = 100,
    eval_batch_size: int = 32,
    max_new_tokens: int = 32,
    base_dir: Path = DEFAULT_BASE_DIR,
    eval_every: int = 0,
    patience: int = 3,
    stop_at: float = 1.0,
    stop_n: int = 48,
    test_n: int = 0,
    init_from: Path | None = None,
    max_minutes: float | None = None,
    device: str = TRAIN_DEVICE,
) -> dict:
    """Train a LoRA expert for `task_name`, score it on the dev split and save it (bf16) with a card in `out_dir`.

    Stopping rule (with `eval_every` > 0): every `eval_every` steps the adapter is scored by greedy decoding on
    `stop_n` dev examples (a dev draw apart from the final dev score's); training stops once that score reaches
    `stop_at` or has not improved for `patience` evaluations, and the best-scoring weights are kept (`steps`
    is then the most it may run). The curve (step, dev score, loss) goes into the card's recipe.
    With `test_n` > 0 the saved adapter is also scored on `test_n` test-split examples and on `test_n`
    examples in held-out phrasing families (measurement only; never used to choose anything).
    `init_from`: an adapter dir to continue training from (warm start) instead of a fresh LoRA.
    `max_minutes`: a wall-clock budget for the training loop (it stops there, keeping the best weights).

    Returns a summary: task, out_dir, dev_accuracy, final_loss, seconds, seconds_per_step, recipe (and
    test_accuracy, held_out_phrasing_accuracy with `test_n`).
    """
    from peft import LoraConfig, get_peft_model

    if schedule not in ("cosine", "constant"):
        raise ValueError("schedule must be 'cosine' or 'constant'")
    task = get_task(task_name)
    if task.kind != "held_in":
        progress(f"warning: training an expert for {task.kind} task {task_name!r}")
    out_dir = Path(out_dir)
    staging = _prepare_out_dir(out_dir)
    torch.set_num_threads(NUM_THREADS)
    random.seed(seed)
    torch.manual_seed(seed)

    recipe = {
        "task": task_name, "base_model": BASE_NAME, "steps": steps, "rank": rank, "alpha": alpha,
        "targets": list(targets), "dropout": 0.0, "lr": lr, "batch_size": batch_size, "seed": seed,
        "optimizer": "AdamW", "weight_decay": weight_decay, "warmup_frac": warmup_frac, "schedule": schedule,
        "train_examples": steps * batch_size, "dtype": "float32", "saved_dtype": "bfloat16",
        "loss": "assistant answer + end-of-turn tokens", "dev_n": dev_n, "max_new_tokens": max_new_tokens,
        "device": resolve_device(device).type,
    }

    model, tokenizer = load_base(base_dir, device)
    if init_from is not None:
        # Warm start: continue training an existing adapter (its rank, alpha and targets win).
        from peft import PeftModel

        config = json.loads((Path(init_from) / CONFIG_FILE).read_text())
        rank, alpha, targets = config["r"], config["lora_alpha"], tuple(config["target_modules"])
        model = PeftModel.from_pretrained(model, str(init_from), is_trainable=True)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        recipe.update(rank=rank, alpha=alpha, targets=sorted(targets), init_from=str(init_from))
    else:
        lora = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)

    train = task.generate("train", steps * batch_size, seed)
    encoded = [encode_example(tokenizer, e) for e in train]
    random.Random(seed).shuffle(encoded)
    pad_id = tokenizer.pad_token_id

    progress(
        f"[{task_name}] training LoRA r={rank} alpha={alpha} on {len(targets)} modules "
        f"({n_trainable / 1e6:.2f}M params), {steps} steps x {batch_size}, lr {lr}"
    )
    curve: list[dict] = []
    best: dict = {"score": -1.0, "step": 0, "state": None, "at": 0}
    stop_set = task.generate("dev", stop_n, seed + 1) if eval_every else []

    def on_eval(step: int, loss: float) -> bool:
        t = time.perf_counter()
        score = evaluate_model(model, tokenizer, stop_set, task, batch_size=eval_batch_size,
                               max_new_tokens=max_new_tokens)
        curve.append({"step": step, "dev": round(score, 4), "loss": round(loss, 4)})
        if score > best["score"]:
            best.update(score=score, step=step, at=len(curve), state=[p.detach().clone() for p in trainable])
        progress(f"[{task_name}] step {step}: dev {score:.3f} on {len(stop_set)} (best {best['score']:.3f} at "
                 f"step {best['step']}; {time.perf_counter() - t:.0f}s)")
        return score >= stop_at or len(curve) - best["at"] >= patience

    final_loss, train_seconds = run_training(
        model, encoded, trainable, steps=steps, batch_size=batch_size, lr=lr, pad_id=pad_id, label=task_name,
        progress=progress, warmup_frac=warmup_frac, schedule=schedule, weight_decay=weight_decay,
        eval_every=eval_every, on_eval=on_eval if eval_every else None,
        deadline=time.time() + 60 * max_minutes if max_minutes else None)
    if best["state"] is not None:
        with torch.no_grad():
            for p, saved in zip(trainable, best["state"]):
                p.copy_(saved)
        recipe.update(stopping={"eval_every": eval_every, "patience": patience, "stop_at": stop_at,
                                "stop_n": stop_n, "best_step": best["step"], "curve": curve})
        recipe["steps_run"] = curve[-1]["step"]

    # Round the LoRA weights to bf16 now, so the dev score is that of the adapter as saved.
    with torch.no_grad():
        for p in trainable:
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    dev = task.generate("dev", dev_n, seed)
    t1 = time.perf_counter()
    dev_accuracy = evaluate_model(model, tokenizer, dev, task, batch_size=eval_batch_size,
                                  max_new_tokens=max_new_tokens)
    progress(f"[{task_name}] dev accuracy {dev_accuracy:.3f} on {len(dev)} examples ({time.perf_counter() - t1:.0f}s)")
    measured: dict = {}
    if test_n:
        for key, examples in (("test_accuracy", task.generate("test", test_n, seed)),
                              ("held_out_phrasing_accuracy", task.generate("test", test_n, seed, held_out_only=True))):
            measured[key] = evaluate_model(model, tokenizer, examples, task, batch_size=eval_batch_size,
                                           max_new_tokens=max_new_tokens)
            progress(f"[{task_name}] {key} {measured[key]:.3f} on {len(examples)} examples")

    generated = generate_description(model, tokenizer, train[:3])
    progress(f"[{task_name}] LLM-written description: {generated!r}")
    _save_adapter(model, staging)
    card = ExpertCard(
        name=task_name,
        description=task.description,
        examples=card_examples(task, seed),
        extra={"recipe": recipe, "dev_accuracy": dev_accuracy, "final_train_loss": final_loss, **measured,
               "generated_description": generated, "generated_by": f"{BASE_NAME} (greedy, few-shot, adapters off)",
               "description_examples": [{"prompt": e.prompt, "answer": e.answer} for e in train[:3]]},
    )
    (staging / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    progress(f"[{task_name}] saved to {out_dir}")
    return {
        "task": task_name,
        "out_dir": str(out_dir),
        "dev_accuracy": dev_accuracy,
        "final_loss": final_loss,
        "seconds": train_seconds,
        "seconds_per_step": train_seconds / max(1, int(recipe.get("steps_run", steps))),  # type: ignore[call-overload]
        "recipe": recipe,
        **measured,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one LoRA expert of the default library.")
    parser.add_argument("task")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev-n", type=int, default=100)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--base-dir", type=Path, default=DEFAULT_BASE_DIR)
    parser.add_argument("--eval-every", type=int, default=0, help="stopping rule: score dev every N steps")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--stop-at", type=float, default=1.0)
    parser.add_argument("--test-n", type=int, default=0)
    parser.add_argument("--init-from", type=Path, default=None, help="adapter dir to continue training from")
    parser.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the training loop")
    parser.add_argument("--stop-n", type=int, default=48, help="dev examples scored by the stopping rule")
    parser.add_argument("--device", default=TRAIN_DEVICE, help="auto (CUDA when there is a GPU), cpu, cuda")
    args = parser.parse_args(argv)
    summary = train_expert(
        args.task, args.out_dir, steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, dev_n=args.dev_n, schedule=args.schedule,
        base_dir=args.base_dir, eval_every=args.eval_every, patience=args.patience, stop_at=args.stop_at,
        test_n=args.test_n, init_from=args.init_from, max_minutes=args.max_minutes, stop_n=args.stop_n,
        device=args.device,
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
