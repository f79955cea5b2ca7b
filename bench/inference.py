"""Embedded inference engine: 8 concurrent requests vs the same 8 one after another, as a ratio.

On the tiny zoo's aligned model with a LoRA adapter (random weights, the serving path does not
care), through ``asft_core.serving.Engine`` (what ``asft infer`` runs): tokens/s when 8
requests arrive together (one batch) vs one at a time, alternating which goes first over
``--rounds`` and comparing medians; time to first token (p50/p99) of the concurrent requests;
and what adapters cost: a request alternating between two loaded adapters vs staying on one,
and loading an adapter the engine lacks. Target: concurrent / sequential >= 3 on 2 CPU cores.

    python bench/inference.py [--requests 8] [--tokens 64] [--rounds 3] [--cache-dir var/cache]

``--url`` measures an OpenAI-compatible server instead (e.g. vLLM with the tiny model and
``--enable-lora``): the same two throughputs over HTTP, streamed, for ``--model``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from asft_core.formats import Message
from asft_core.serving import Delta, Engine, Sampling
from asft_core.zoo import build_zoo

PROMPTS = (
    "How do I bake bread?",
    "Classify the sentiment: I loved it.",
    "What is 12 + 30?",
    "Write a short note to a friend.",
    "Classify the sentiment: a dull, lifeless film.",
    "How do plants grow?",
    "What is 7 + 8?",
    "Tell me about the sea.",
)


def make_adapter(model: Path, folder: Path, seed: int) -> Path:
    """A rank-8 q/v LoRA with random weights on ``model``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)), config)
    peft_model.save_pretrained(str(folder))
    return folder


def run(
    engine: Engine, model: str, prompts: list[str], tokens: int, together: bool
) -> tuple[float, list[float]]:
    """Send ``prompts`` together or one after another; (tokens/s, seconds to first token)."""
    sampling = Sampling(temperature=0, max_tokens=tokens, ignore_eos=True)
    first: list[float] = []
    produced = 0
    lock = threading.Lock()

    def send(prompt: str) -> threading.Event:
        done, sent = threading.Event(), time.perf_counter()
        seen = False

        def emit(delta: Delta) -> None:
            nonlocal seen, produced
            with lock:
                if not seen and (delta.text or delta.finish_reason):
                    seen = True
                    first.append(time.perf_counter() - sent)
                if delta.finish_reason or delta.error:
                    produced += delta.completion_tokens
                    done.set()

        engine.submit(model, [Message("user", prompt)], sampling, emit)
        return done

    started = time.perf_counter()
    if together:
        for event in [send(p) for p in prompts]:
            event.wait()
    else:
        for prompt in prompts:
            send(prompt).wait()
    return produced / (time.perf_counter() - started), first


def run_http(url: str, model: str, prompts: list[str], tokens: int, together: bool) -> float:
    """Tokens/s of an OpenAI-compatible server at ``url`` (streamed, usage counted)."""
    import httpx

    produced = 0
    lock = threading.Lock()

    def send(prompt: str) -> None:
        nonlocal produced
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        answer.raise_for_status()
        with lock:
            produced += answer.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    if together:
        threads = [threading.Thread(target=send, args=(p,)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for prompt in prompts:
            send(prompt)
    return produced / (time.perf_counter() - started)


def main_http(url: str, model: str, prompts: list[str], tokens: int, rounds: int) -> None:
    """The throughput comparison against a server."""
    together = [run_http(url, model, prompts, tokens, True) for _ in range(rounds)]
    alone = [run_http(url, model, prompts, tokens, False) for _ in range(rounds)]
    fast, slow = statistics.median(together), statistics.median(alone)
    print(f"server={url} model={model} requests={len(prompts)} tokens={tokens}")
    print(f"concurrent: {fast:.1f} tokens/s; one at a time: {slow:.1f}; ratio {fast / slow:.1f}x")


def latency(engine: Engine, models: list[str], repeats: int) -> float:
    """Median seconds of a short request, cycling through ``models``."""
    times = []
    for index in range(repeats):
        started = time.perf_counter()
        run(engine, models[index % len(models)], [PROMPTS[0]], 8, together=False)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    """Print both throughputs and their ratio, time to first token, and adapter costs."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path("var/cache"))
    parser.add_argument("--url", help="an OpenAI-compatible server to measure instead")
    parser.add_argument("--model", help="with --url: the model (or adapter) name to ask for")
    args = parser.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    if args.url:
        main_http(args.url.rstrip("/"), args.model, prompts, args.tokens, args.rounds)
        return
    zoo = build_zoo(args.cache_dir / "zoo", verbose=True)
    engine = Engine(max_batch=args.requests)
    engine.load_base("tiny", str(zoo.aligned))
    with tempfile.TemporaryDirectory() as folder:
        for name in ("a", "b", "c"):
            make_adapter(zoo.aligned, Path(folder) / name, seed=ord(name))
        engine.load_adapter("a", str(Path(folder) / "a"), "tiny")
        engine.load_adapter("b", str(Path(folder) / "b"), "tiny")
        run(engine, "a", prompts[:2], 8, together=True)  # warm-up
        together: list[float] = []
        alone: list[float] = []
        first: list[float] = []
        for round_ in range(args.rounds):
            for mode in (True, False) if round_ % 2 == 0 else (False, True):
                rate, ttft = run(engine, "a", prompts, args.tokens, together=mode)
                (together if mode else alone).append(rate)
                first += ttft if mode else []
        same = latency(engine, ["a"], 12)
        switching = latency(engine, ["a", "b"], 12)
        started = time.perf_counter()
        engine.load_adapter("c", str(Path(folder) / "c"), "tiny")
        load_s = time.perf_counter() - started
    engine.close()
    fast, slow = statistics.median(together), statistics.median(alone)
    print(f"device=cpu torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"requests={args.requests} tokens={args.tokens} each, rounds={args.rounds}")
    print(f"concurrent:     {fast:8.1f} tokens/s")
    print(f"one at a time:  {slow:8.1f} tokens/s")
    print(f"ratio: {fast / slow:.1f}x (target >= 3x)")
    p50, p99 = percentile(first, 0.5), percentile(first, 0.99)
    print(f"time to first token (concurrent): p50 {1000 * p50:.0f} ms, p99 {1000 * p99:.0f} ms")
    print(
        f"8-token request: same adapter {1000 * same:.0f} ms, alternating two "
        f"{1000 * switching:.0f} ms ({switching / same:.2f}x); loading a new adapter "
        f"{1000 * load_s:.0f} ms"
    )


if __name__ == "__main__":
    main()
