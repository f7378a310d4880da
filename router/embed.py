"""Query embeddings with all-MiniLM-L6-v2, micro-batched: concurrent queries share one forward pass.

The model is run directly through transformers (mean pooling + L2 normalisation, exactly what its
sentence-transformers pipeline does) to skip sentence-transformers' per-call overhead.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

MAX_SEQ_LEN = 256  # all-MiniLM-L6-v2's sentence-transformers max_seq_length


class Embedder:
    """Synchronous encoder. `encode` is thread-compatible but not re-entrant; MicroBatcher serialises calls."""

    def __init__(self, model_dir: Path, threads: int = 1):
        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()
        self.dim = self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


class MicroBatcher:
    """Collects the queries that arrive while the previous batch runs and encodes them together."""

    def __init__(self, embedder: Embedder, max_batch: int = 64):
        self.embedder = embedder
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[str, asyncio.Future]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._worker: asyncio.Task | None = None
        self.last_batch_size = 0

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, text: str) -> np.ndarray:
        self.start()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((text, future))
        return await future

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.embedder.dim), dtype=np.float32)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embedder.encode, texts)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while len(items) < self.max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            items = [(t, f) for t, f in items if not f.cancelled()]
            if not items:
                continue
            self.last_batch_size = len(items)
            try:
                vectors = await loop.run_in_executor(self._executor, self.embedder.encode, [t for t, _ in items])
            except Exception as exc:  # surface to every waiter instead of killing the worker
                for _, f in items:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), v in zip(items, vectors):
                if not f.done():
                    f.set_result(v)

