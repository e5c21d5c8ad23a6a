""":class:`VLLM`: vLLM's offline engine on this machine's GPUs (or CPU), with every answer cached.

Examples
--------
>>> from dreamer_magic import VLLM
>>> llm = VLLM("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16", max_model_len=4096)  # doctest: +SKIP
>>> llm.generate(["Name a colour."], max_new_tokens=8, temperature=0)  # doctest: +SKIP
['Blue.']

The ``[vllm]`` extra. The engine is built when the backend is made (that loads the weights);
``generate`` hands the misses to it in batches of ``batch_size`` and commits each batch. A
vLLM *server* is reached with :class:`~dreamer_magic.OpenAILLM` (``base_url=``) instead.

Key
    ``"backend"`` is ``{"kind": "vllm", "model": ..., "weights": ..., "engine": {...}}``: the
    model's name, a digest of a local model folder's files (names, sizes, the JSON and text
    files' content, the first and last MiB of each weight file), and the engine arguments that
    can change an answer (all of them but :data:`NOT_IN_KEY`). Sampling fields are the same
    OpenAI-style names as for the API backends (``max_tokens``, ``temperature``, ``top_p``,
    ``stop``, ``seed``, extra ``SamplingParams`` fields).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any, AsyncIterator

from ..cache import canonical_json, jsonable, request_key
from ..errors import DreamerError
from .base import Backend, BackendError, Job, answer, missing_extra

__all__ = ["VLLM", "NOT_IN_KEY", "weights_digest"]

# engine arguments that decide speed or memory, never an answer
NOT_IN_KEY = frozenset({
    "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager", "disable_log_stats",
    "max_num_seqs", "max_num_batched_tokens", "disable_custom_all_reduce", "download_dir",
    "trust_remote_code", "tensor_parallel_size", "pipeline_parallel_size", "block_size",
    "enable_prefix_caching", "compilation_config",
})
_MIB = 1 << 20


def weights_digest(path: str | os.PathLike) -> str | None:
    """A digest of a local model folder (``None`` for a hub name): changes when the weights do.

    Examples
    --------
    >>> weights_digest("/models/qwen")  # doctest: +SKIP
    '6c1f...'
    """
    import xxhash

    folder = Path(path)
    if not folder.is_dir():
        return None
    h = xxhash.xxh3_128()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = file.relative_to(folder).as_posix()
        size = file.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(file, "rb") as f:
            if file.suffix in (".json", ".txt", ".model", ".jinja") or size <= 2 * _MIB:
                h.update(f.read())
            else:
                h.update(f.read(_MIB))
                f.seek(size - _MIB)
                h.update(f.read(_MIB))
    return h.hexdigest()


class VLLM(Backend):
    """A model run by vLLM's offline engine in this process, with every answer cached.

    Examples
    --------
    >>> llm = VLLM("path/to/model", max_model_len=2048)  # doctest: +SKIP
    >>> llm.generate([[{"role": "user", "content": "Hi!"}]], max_new_tokens=16, n=2, temperature=1.0)  # doctest: +SKIP
    [['Hello!', 'Hi there!']]

    Parameters
    ----------
    path
        A local model folder or a model name vLLM can load.
    system_prompt, mode, name, prices, output_folder
        As for :class:`~dreamer_magic.OpenAILLM` (chat mode applies the model's chat template).
    batch_size
        Prompts per engine call (default 256); not part of the key.
    engine
        An engine made already (``vllm.LLM(...)``), instead of building one from ``path``.
    **engine_kwargs
        Arguments for ``vllm.LLM`` (``dtype``, ``max_model_len``, ``quantization``...); those
        that can change an answer are part of the key.
    """

    kind = "vllm"

    def __init__(self, path: str | os.PathLike, *, system_prompt: str | None = None, mode: str = "chat",
                 batch_size: int = 256, name: str | None = None, prices: dict | None = None,
                 output_folder: Any = None, engine: Any = None, **engine_kwargs: Any) -> None:
        if engine is None:
            try:
                import vllm
            except ImportError:
                raise missing_extra("VLLM", "vllm", "vllm") from None
        model = str(path)
        super().__init__(model, mode=mode, system_prompt=system_prompt, concurrency=1, name=name,
                         prices=prices, output_folder=output_folder)
        self.max_batch = int(batch_size)
        self.engine_kwargs = dict(engine_kwargs)
        self._engine_key = {
            k: jsonable(v, f"the engine argument {k!r}") for k, v in sorted(engine_kwargs.items())
            if k not in NOT_IN_KEY
        }
        self._weights = weights_digest(model)
        self.engine = engine if engine is not None else vllm.LLM(model=model, **engine_kwargs)

    def __repr__(self) -> str:
        return f"VLLM({self.model!r})"

    def _backend_key(self) -> Any:
        local = Path(self.model).is_dir()
        return {
            "engine": self._engine_key,
            "kind": "vllm",
            "model": Path(self.model).name if local else self.model,
            "weights": self._weights,
        }

    def _model_params(self) -> dict:
        return {}

    @property
    def database(self):
        from .. import cache as _cache

        stem = self.name or f"vllm-{Path(self.model).name or self.model}"
        digest = request_key(canonical_json([self._backend_key(), self.name]))
        return _cache.open_database(_cache.database_name(stem, digest), _cache.cache_folder(self.output_folder))

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Any]:
        async def call(batch: list[Job]) -> list[list[str]]:
            return await asyncio.to_thread(self._run, batch)

        yield call

    def _run(self, batch: list[Job]) -> list[list[str]]:
        from vllm import SamplingParams

        params = []
        for job in batch:
            body = job.request_body()
            fields = {k: v for k, v in body.items() if k not in ("messages", "prompt")}
            fields["n"] = len(job.keys)
            try:
                params.append(SamplingParams(**fields))
            except (TypeError, ValueError) as e:
                raise BackendError(f"vLLM refused the sampling parameters {fields}: {e}") from None
        if self.mode == "chat":
            outputs = self.engine.chat([j.body["messages"] for j in batch], sampling_params=params, use_tqdm=False)
        else:
            outputs = self.engine.generate([j.body["prompt"] for j in batch], sampling_params=params, use_tqdm=False)
        model = Path(self.model).name
        rows = []
        for out in outputs:
            completion_tokens = sum(len(o.token_ids) for o in out.outputs)
            usage = {"prompt_tokens": len(out.prompt_token_ids or []), "completion_tokens": completion_tokens}
            rows.append([
                answer(o.text, o.finish_reason, model, None, usage, len(out.outputs)) for o in out.outputs
            ])
        return rows
