"""Serving fine-tuned models: the embedded engine, and the check that vLLM can load an adapter.

The engine holds one base model per folder and any number of LoRA adapters on it (loaded on
first use, least recently used evicted past a bound). Requests that arrive together are
decoded together in one batch, with each row's adapter chosen by peft's mixed-batch
``adapter_names`` (``"__base__"`` for the model without one), left padding and a key/value
cache. A batch runs until its last row ends (static batching: a request arriving meanwhile
waits for the next batch). Greedy decoding of one request equals ``PeftModel.generate``
token for token (a test checks it).

Prompts are rendered by :func:`asft_core.data.generation_prompt`, the rendering training uses,
with the chat template saved beside the adapter when it has one, so the adapter is served
with the template it was trained with.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asft_core.checkpoints import CHAT_TEMPLATE_FILE
from asft_core.formats import ROLES, Message

# peft's name for "no adapter" in a mixed batch.
NO_ADAPTER = "__base__"
# Below this temperature, sampling is greedy (dividing logits by it would overflow).
MIN_TEMPERATURE = 1e-5
# vLLM's accepted --max-lora-rank values, and its default.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Linear layers vLLM can put LoRA on, per architecture (its packed-module mappings).
_LLAMA_LIKE = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)
VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Gemma2ForCausalLM": _LLAMA_LIKE,
    "Phi3ForCausalLM": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
}


class EngineError(ValueError):
    """A request the engine cannot serve; ``code`` is machine-readable, ``status`` an HTTP one."""

    def __init__(self, code: str, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. ``temperature`` 0 is greedy; ``max_tokens`` None: up to the context."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Delta:
    """A piece of an answer: new text, and on the last piece why it ended and the token counts."""

    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last piece
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: EngineError | None = None


@dataclass
class _Request:
    base: _Base
    adapter: _Adapter | None
    ids: list[int]
    sampling: Sampling
    max_tokens: int
    emit: Callable[[Delta], None]
    generator: torch.Generator
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already emitted
    done: bool = False


@dataclass
class _Adapter:
    name: str  # the public name (a model id, which may hold dots)
    key: str  # peft's name for it: torch module names may not hold dots
    path: Path
    chat_template: str | None
    in_use: int = 0


class _Base:
    """A loaded base model, its tokenizer, and the adapters on it."""

    def __init__(self, name: str, path: str, device: torch.device) -> None:
        from asft_core.training import load_model_and_tokenizer, quiet_peft_warnings

        with quiet_peft_warnings():
            self.model, self.tokenizer = load_model_and_tokenizer(path, torch.float32, device)
        self.model.eval()
        self.name = name
        self.path = path
        self.device = device
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.adapters: OrderedDict[str, _Adapter] = OrderedDict()
        stops = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        stops.update(configured if isinstance(configured, list) else [configured])
        self.eos_ids = frozenset(t for t in stops if t is not None)
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )

    def prompt_ids(self, messages: Sequence[Message], adapter: _Adapter | None) -> list[int]:
        """Token ids of the prompt, with the adapter's training template when it has one."""
        from jinja2 import TemplateError

        from asft_core.data import generation_prompt

        template = adapter.chat_template if adapter is not None else None
        try:
            text = generation_prompt(self.tokenizer, messages, template)
        except TemplateError as error:  # e.g. a template that needs alternating roles
            raise EngineError(
                "invalid_messages", f"the model's chat template refused them: {error}", 400
            ) from error
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids


class Engine:
    """Base models and LoRA adapters behind one batching decode loop on a thread of its own.

    Thread-safe: ``load_*``, ``submit`` and ``models`` may be called from any thread.
    """

    def __init__(
        self,
        device: str = "cpu",
        max_adapters: int = 8,
        max_batch: int = 16,
        default_max_tokens: int = 256,
        batch_wait_s: float = 0.005,
    ) -> None:
        """Start the decode thread; nothing is loaded until asked for."""
        self.device = torch.device(device)
        self.max_adapters = max_adapters
        self.max_batch = max_batch
        self.default_max_tokens = default_max_tokens
        self.batch_wait_s = batch_wait_s
        self._bases: dict[str, _Base] = {}
        self._adapter_base: dict[str, str] = {}
        self._loaded = 0  # adapters ever loaded: their peft keys
        # Held while a batch runs a forward pass and while adapters are added or removed.
        self._model_lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._pending: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="asft-engine", daemon=True)
        self._thread.start()

    # -- models ---------------------------------------------------------------------------

    def load_base(self, name: str, path: str | None = None) -> None:
        """Load the model at ``path`` (default: ``name``) under ``name``; a no-op when loaded."""
        with self._load_lock:
            if name not in self._bases:
                self._bases[name] = _Base(name, path or name, self.device)

    def _base_for(self, name: str) -> _Base:
        if name in self._bases:
            return self._bases[name]
        if (Path(name) / "config.json").is_file():  # a model folder named by its path
            self.load_base(name)
            return self._bases[name]
        raise EngineError("model_not_found", f"The model `{name}` does not exist.", 404, "model")

    def load_adapter(self, name: str, path: str, base: str | None = None) -> bool:
        """Load the PEFT folder ``path`` as ``name`` on ``base``; False when already loaded.

        ``base`` may be omitted when exactly one base is loaded (vLLM's form of the call).
        """
        from peft import PeftModel

        from asft_core.training import quiet_peft_warnings

        if name in self._bases:
            raise EngineError("invalid_adapter", f"{name!r} names a base model", 400, "lora_name")
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise EngineError("adapter_not_found", f"no PEFT adapter at {path!r}", 400, "lora_path")
        with self._load_lock:
            if name in self._adapter_base:
                return False
        if base is None:
            if len(self._bases) != 1:
                raise EngineError("base_model_required", "name the adapter's base model", 400)
            base = next(iter(self._bases))
        target = self._base_for(base)
        template_path = folder / CHAT_TEMPLATE_FILE
        template = template_path.read_text() if template_path.is_file() else None
        with self._load_lock, self._model_lock:
            if name in self._adapter_base:
                return False
            self._loaded += 1
            key = f"adapter_{self._loaded}"
            try:
                with quiet_peft_warnings():
                    if isinstance(target.model, PeftModel):
                        target.model.load_adapter(str(folder), adapter_name=key)
                    else:
                        target.model = PeftModel.from_pretrained(
                            target.model, str(folder), adapter_name=key
                        )
            except (ValueError, OSError, RuntimeError, KeyError) as error:
                raise EngineError("invalid_adapter", f"cannot load {path!r}: {error}") from error
            target.model.eval()
            target.adapters[name] = _Adapter(name, key, folder, template)
            self._adapter_base[name] = target.name
            self._evict(target, keep=name)
        return True

    def _evict(self, base: _Base, keep: str) -> None:
        """Drop least recently used adapters no request is using (never ``keep``), down to
        ``max_adapters``; adapters in use stay, over the bound, until a later load."""
        total = len(self._adapter_base)
        for adapter in list(base.adapters.values()):
            if total <= self.max_adapters:
                return
            if adapter.in_use == 0 and adapter.name != keep:
                self._drop(base, adapter.name)
                total -= 1

    def _drop(self, base: _Base, name: str) -> None:
        """Remove adapter ``name`` from ``base`` (the caller holds both locks)."""
        adapter = base.adapters.pop(name)
        if base.adapters:
            base.model.delete_adapter(adapter.key)
        else:
            base.model = base.model.unload()  # peft keeps at least one adapter
        self._adapter_base.pop(name, None)

    def unload_adapter(self, name: str) -> None:
        """Remove adapter ``name``: new requests no longer find it, and it goes once the
        requests already using it end (up to a minute)."""
        with self._load_lock:
            if name not in self._adapter_base:
                raise EngineError(
                    "adapter_not_found", f"The lora adapter '{name}' cannot be found.", 404
                )
            base = self._bases[self._adapter_base.pop(name)]
            adapter = base.adapters[name]
        deadline = time.monotonic() + 60
        while True:
            with self._load_lock, self._model_lock:
                if adapter.in_use == 0:
                    self._drop(base, name)
                    return
            if time.monotonic() > deadline:
                raise EngineError("adapter_in_use", f"adapter {name!r} is still in use", 409)
            time.sleep(0.01)

    def models(self) -> list[dict[str, Any]]:
        """Loaded bases and adapters, as vLLM lists them (an adapter's ``parent`` is its base)."""
        with self._load_lock:
            listed: list[dict[str, Any]] = []
            for base in self._bases.values():
                listed.append({"id": base.name, "root": base.path, "parent": None})
                listed += [
                    {"id": a.name, "root": str(a.path), "parent": base.name}
                    for a in base.adapters.values()
                    if a.name in self._adapter_base  # not one being unloaded
                ]
            return listed

    def context_length(self, model: str) -> int:
        """The context window of ``model`` (a base, or an adapter's base), in tokens."""
        return self._resolve(model)[0].context

    # -- requests -------------------------------------------------------------------------

    def _resolve(self, model: str, pin: bool = False) -> tuple[_Base, _Adapter | None]:
        """The base and adapter ``model`` names; ``pin`` keeps the adapter from eviction."""
        with self._load_lock:
            base_name = self._adapter_base.get(model)
            if base_name is not None:
                base = self._bases[base_name]
                base.adapters.move_to_end(model)  # most recently used
                adapter = base.adapters[model]
                adapter.in_use += pin
                return base, adapter
        return self._base_for(model), None

    def _unpin(self, adapter: _Adapter | None) -> None:
        if adapter is not None:
            with self._load_lock:
                adapter.in_use -= 1

    def submit(
        self,
        model: str,
        messages: Sequence[Message],
        sampling: Sampling,
        emit: Callable[[Delta], None],
    ) -> threading.Event:
        """Queue a chat completion; ``emit`` gets its pieces from the decode thread.

        Returns an event to set to cancel it (the client went away). Raises
        :class:`EngineError` for an unknown model or a prompt that does not fit.
        """
        if not messages:
            raise EngineError("invalid_messages", "messages must not be empty", 400, "messages")
        for message in messages:
            if message.role not in ROLES:
                raise EngineError("invalid_role", f"unknown role {message.role!r}", 400, "messages")
        base, adapter = self._resolve(model, pin=True)
        try:
            request = self._request(base, adapter, messages, sampling, emit)
        except BaseException:
            self._unpin(adapter)
            raise
        with self._wake:
            self._pending.append(request)
            self._wake.notify()
        return request.cancelled

    def _request(
        self,
        base: _Base,
        adapter: _Adapter | None,
        messages: Sequence[Message],
        sampling: Sampling,
        emit: Callable[[Delta], None],
    ) -> _Request:
        ids = base.prompt_ids(messages, adapter)
        room = base.context - len(ids)
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise EngineError(
                "context_length_exceeded",
                f"This model's maximum context length is {base.context} tokens; the messages "
                f"take {len(ids)} and max_tokens asks for {sampling.max_tokens} more.",
                400,
                "max_tokens",
            )
        if room < 1:
            raise EngineError(
                "context_length_exceeded",
                f"the messages take {len(ids)} tokens of a {base.context}-token context",
                400,
                "messages",
            )
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        return _Request(
            base=base,
            adapter=adapter,
            ids=ids,
            sampling=sampling,
            max_tokens=sampling.max_tokens or min(room, self.default_max_tokens),
            emit=emit,
            generator=torch.Generator().manual_seed(seed),
        )

    @property
    def alive(self) -> bool:
        """Whether the decode thread runs (it only ends on :meth:`close`)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the decode thread after the running batch."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # -- the decode loop ------------------------------------------------------------------

    def _next_batch(self) -> list[_Request] | None:
        with self._wake:
            while not self._pending and not self._stopped:
                self._wake.wait()
            if self._stopped:
                return None
        time.sleep(self.batch_wait_s)  # let requests sent together arrive together
        with self._wake:
            base = self._pending[0].base
            batch = [r for r in self._pending if r.base is base][: self.max_batch]
            for request in batch:
                self._pending.remove(request)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._decode(batch)
            except Exception as error:  # every waiting client must hear of it
                failure = EngineError("engine_error", f"generation failed: {error}", 500)
                for request in batch:
                    if not request.done:
                        request.emit(Delta("", error=failure))
            finally:
                for request in batch:
                    self._unpin(request.adapter)

    @torch.no_grad()
    def _decode(self, batch: list[_Request]) -> None:
        from peft import PeftModel

        base = batch[0].base
        width = max(len(r.ids) for r in batch)
        input_ids = torch.full((len(batch), width), base.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            input_ids[row, width - len(request.ids) :] = torch.tensor(request.ids)
            mask[row, width - len(request.ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        names = [r.adapter.key if r.adapter else NO_ADAPTER for r in batch]
        past = None
        step_ids = input_ids
        for _ in range(max(r.max_tokens for r in batch)):
            with self._model_lock:
                extra = {"adapter_names": names} if isinstance(base.model, PeftModel) else {}
                out = base.model(
                    input_ids=step_ids.to(base.device),
                    attention_mask=mask.to(base.device),
                    position_ids=positions.to(base.device),
                    cache=past,
                    use_cache=True,
                    logits_to_keep=1,
                    **extra,
                )
            past = out.cache
            logits = out.logits[:, -1, :].float().cpu()
            chosen = []
            for row, request in enumerate(batch):
                if request.done:
                    chosen.append(base.pad_id)
                    continue
                token = _pick(logits[row], request.sampling, request.generator)
                chosen.append(token)
                self._advance(request, token)
            if all(r.done for r in batch):
                return
            step_ids = torch.tensor(chosen).unsqueeze(1)
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1

    def _advance(self, request: _Request, token: int) -> None:
        """Add ``token`` to ``request``, emit the text that is now certain, end it if due."""
        base = request.base
        request.tokens.append(token)
        finish = None
        if token in base.eos_ids and not request.sampling.ignore_eos:
            finish = "stop"
        elif len(request.tokens) >= request.max_tokens:
            finish = "length"
        elif request.cancelled.is_set():
            finish = "cancelled"
        text = base.tokenizer.decode(request.tokens, skip_special_tokens=True)
        stops = [text.find(s) for s in request.sampling.stop if s in text]
        if stops:
            text, finish = text[: min(stops)], "stop"
        if finish is None:
            hold = max((len(s) for s in request.sampling.stop), default=1) - 1
            ready = len(text) - hold
            if text.endswith("\ufffd"):  # a character cut in the middle of its bytes
                ready = min(ready, len(text) - 1)
            if ready > request.sent:
                request.emit(Delta(text[request.sent : ready]))
                request.sent = ready
            return
        request.done = True
        request.emit(
            Delta(
                text[request.sent :],
                finish_reason=finish,
                prompt_tokens=len(request.ids),
                completion_tokens=len(request.tokens),
            )
        )


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token: argmax at temperature 0, else a draw from the top-p nucleus."""
    if sampling.temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if not torch.isfinite(probs).all():  # overflow at a tiny temperature: as greedy
        return int(logits.argmax())
    if sampling.top_p < 1:
        ordered, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = ordered.cumsum(0) - ordered >= sampling.top_p
        ordered[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))


# -- the serving check ----------------------------------------------------------------------


@dataclass(frozen=True)
class ServingCheck:
    """Whether vLLM can load an adapter, and why not."""

    vllm_loadable: bool
    problems: tuple[str, ...]
    rank: int | None
    max_lora_rank: int
    target_modules: tuple[str, ...]
    architecture: str | None
    chat_template: bool

    def to_json(self) -> dict[str, Any]:
        """The report's ``serving`` section."""
        return {
            "vllm_loadable": self.vllm_loadable,
            "problems": list(self.problems),
            "rank": self.rank,
            "max_lora_rank": self.max_lora_rank,
            "target_modules": list(self.target_modules),
            "architecture": self.architecture,
            "chat_template": self.chat_template,
        }


def serving_check(
    adapter_dir: Path, architecture: str | None, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK
) -> ServingCheck:
    """Check the PEFT folder ``adapter_dir`` against vLLM's rules for LoRA adapters.

    LoRA only, no ``modules_to_save``, no DoRA, rank within ``max_lora_rank`` (what the
    deployment passes as ``--max-lora-rank``), and target modules vLLM supports for the
    base model's ``architecture`` (e.g. ``LlamaForCausalLM``).
    """
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r}: vLLM serves LoRA only")
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save {config['modules_to_save']!r}: vLLM refuses adapters that "
            "replace whole modules"
        )
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not serve DoRA adapters")
    rank = config.get("r")
    if isinstance(rank, int) and rank > max_lora_rank:
        problems.append(f"rank {rank} is above --max-lora-rank {max_lora_rank}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # peft allows a regular expression
        problems.append(f"target_modules is a pattern ({targets!r}): vLLM needs module names")
        targets = []
    targets = sorted(targets)
    supported = VLLM_LORA_MODULES.get(architecture or "")
    if supported is None:
        problems.append(f"architecture {architecture!r} is not in this check's vLLM table")
    else:
        unsupported = [t for t in targets if t not in supported]
        if unsupported:
            problems.append(f"vLLM has no LoRA support for {unsupported} on {architecture}")
    return ServingCheck(
        vllm_loadable=not problems,
        problems=tuple(problems),
        rank=rank if isinstance(rank, int) else None,
        max_lora_rank=max_lora_rank,
        target_modules=tuple(targets),
        architecture=architecture,
        chat_template=(adapter_dir / CHAT_TEMPLATE_FILE).is_file(),
    )


def model_architecture(model_ref: str) -> str | None:
    """The first ``architectures`` entry of a model's config (a folder or a hub id)."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(model_ref).architectures or [None]
    return architectures[0]
