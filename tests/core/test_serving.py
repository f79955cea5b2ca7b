"""The embedded engine (``asft_core.serving``) on the tiny pair: greedy answers equal
``PeftModel.generate`` token for token, alone and batched with other adapters; adapters come
and go without a restart; sampling, stop strings and the context limit; the serving check.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from asft_core.checkpoints import CHAT_TEMPLATE_FILE
from asft_core.formats import Message
from asft_core.serving import (
    Delta,
    Engine,
    EngineError,
    Sampling,
    model_architecture,
    serving_check,
)
from asft_core.zoo import ZooPaths

GREEDY = Sampling(temperature=0, max_tokens=24)
PROMPTS = ("How do I bake bread?", "Classify the sentiment: I loved it.", "What is 3 + 4?")


def make_adapter(zoo: ZooPaths, folder: Path, seed: int, **options: object) -> Path:
    """A LoRA adapter with random (non-zero) weights on the aligned model, saved to ``folder``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(zoo.aligned))
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,  # random B too: the adapter changes the answers
        **options,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(0.5)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def adapters(zoo: ZooPaths, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(zoo, root / "one", 1), make_adapter(zoo, root / "two", 2)


@pytest.fixture(scope="module")
def engine(zoo: ZooPaths) -> Iterator[Engine]:
    torch.set_num_threads(1)
    engine = Engine(max_adapters=2)
    engine.load_base("tiny", str(zoo.aligned))
    yield engine
    engine.close()


def complete(
    engine: Engine, model: str, prompt: str, sampling: Sampling = GREEDY
) -> tuple[str, Delta]:
    """One request through ``submit``; the whole answer and its last piece."""
    pieces: list[Delta] = []
    finished = threading.Event()

    def emit(delta: Delta) -> None:
        pieces.append(delta)
        if delta.finish_reason or delta.error:
            finished.set()

    engine.submit(model, [Message("user", prompt)], sampling, emit)
    assert finished.wait(120)
    assert pieces[-1].error is None, pieces[-1].error
    return "".join(p.text for p in pieces), pieces[-1]


def reference(zoo: ZooPaths, adapter: Path | None, prompt: str) -> tuple[str, int]:
    """``PeftModel.generate``'s greedy answer (or the base's) and its token count."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(zoo.aligned))
    model = AutoModelForCausalLM.from_pretrained(str(zoo.aligned))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GREEDY.max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = output[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_greedy_answers_equal_peft_generate(
    engine: Engine, zoo: ZooPaths, adapters: tuple[Path, Path]
) -> None:
    assert engine.load_adapter("one", str(adapters[0]), "tiny")
    assert not engine.load_adapter("one", str(adapters[0]), "tiny")  # already there
    for prompt in PROMPTS:
        text, last = complete(engine, "one", prompt)
        expected, tokens = reference(zoo, adapters[0], prompt)
        assert (text, last.completion_tokens) == (expected, tokens)
        base_text, _ = complete(engine, "tiny", prompt)
        assert base_text == reference(zoo, None, prompt)[0]
    # The adapter changes the answers, so the comparison above is not base against base.
    assert [complete(engine, "one", p)[0] for p in PROMPTS] != [
        complete(engine, "tiny", p)[0] for p in PROMPTS
    ]


def test_a_mixed_batch_answers_as_each_request_alone(
    engine: Engine, adapters: tuple[Path, Path]
) -> None:
    engine.load_adapter("one", str(adapters[0]), "tiny")
    engine.load_adapter("two", str(adapters[1]), "tiny")
    cases = [(m, p) for m in ("one", "two", "tiny") for p in PROMPTS]
    alone = [complete(engine, m, p)[0] for m, p in cases]
    results: list[str] = [""] * len(cases)
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, complete(engine, *cases[i])[0]))
        for i in range(len(cases))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == alone


def test_adapters_are_added_and_evicted_without_a_restart(
    engine: Engine, zoo: ZooPaths, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    third = make_adapter(zoo, tmp_path / "three", 3)
    engine.load_adapter("one", str(adapters[0]), "tiny")
    engine.load_adapter("two", str(adapters[1]), "tiny")
    complete(engine, "one", PROMPTS[0])  # "two" is now the least recently used
    engine.load_adapter("three", str(third), "tiny")
    names = {m["id"] for m in engine.models()}
    assert {"one", "three", "tiny"} <= names and "two" not in names  # max_adapters = 2
    with pytest.raises(EngineError) as missing:
        complete(engine, "two", PROMPTS[0])
    assert missing.value.code == "model_not_found" and missing.value.status == 404
    engine.unload_adapter("three")
    assert "three" not in {m["id"] for m in engine.models()}
    with pytest.raises(EngineError):
        engine.unload_adapter("three")


def test_sampling_is_seeded_and_stops_where_asked(engine: Engine) -> None:
    sampling = Sampling(temperature=1.0, top_p=0.9, max_tokens=16, seed=7)
    first, _ = complete(engine, "tiny", PROMPTS[0], sampling)
    assert complete(engine, "tiny", PROMPTS[0], sampling)[0] == first
    greedy, _ = complete(engine, "tiny", PROMPTS[0])
    cut = greedy[3:6]
    stopped, last = complete(engine, "tiny", PROMPTS[0], Sampling(temperature=0, stop=(cut,)))
    assert last.finish_reason == "stop"
    assert stopped == greedy[: greedy.index(cut)]
    _, limited = complete(engine, "tiny", PROMPTS[0], Sampling(temperature=0, max_tokens=2))
    assert (limited.finish_reason, limited.completion_tokens) == ("length", 2)


def test_dotted_names_tiny_temperatures_and_refusing_templates(
    engine: Engine, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    # Model ids hold dots ("ft:qwen2.5-0.5b:..."), which torch refuses in module names.
    dotted = "ft:qwen2.5-0.5b:team::abc"
    assert engine.load_adapter(dotted, str(adapters[0]), "tiny")
    greedy, _ = complete(engine, dotted, PROMPTS[1])
    # A temperature too small to divide by is greedy, not a NaN that fails the batch.
    assert (
        complete(engine, dotted, PROMPTS[1], Sampling(temperature=1e-40, max_tokens=24))[0]
        == greedy
    )
    engine.unload_adapter(dotted)
    folder = tmp_path / "strict"
    shutil.copytree(adapters[0], folder)
    (folder / CHAT_TEMPLATE_FILE).write_text(
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversations must start with a user message') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    engine.load_adapter("strict", str(folder), "tiny")
    with pytest.raises(EngineError) as refused:
        engine.submit("strict", [Message("assistant", "hi")], GREEDY, lambda _: None)
    assert refused.value.code == "invalid_messages" and refused.value.status == 400
    engine.unload_adapter("strict")


def test_bad_requests_are_engine_errors(engine: Engine) -> None:
    def ignore(_: Delta) -> None:
        return None

    cases = [
        ("tiny", [Message("user", "hi")], Sampling(max_tokens=10_000), "context_length_exceeded"),
        ("tiny", [Message("user", "word " * 400)], Sampling(), "context_length_exceeded"),
        ("tiny", [], Sampling(), "invalid_messages"),
        ("tiny", [Message("robot", "hi")], Sampling(), "invalid_role"),
        ("nope", [Message("user", "hi")], Sampling(), "model_not_found"),
    ]
    for model, messages, sampling, code in cases:
        with pytest.raises(EngineError) as error:
            engine.submit(model, messages, sampling, ignore)
        assert error.value.code == code
    with pytest.raises(EngineError) as missing:
        engine.load_adapter("x", "/no/such/folder", "tiny")
    assert missing.value.code == "adapter_not_found"


def test_the_adapters_chat_template_is_used(
    engine: Engine, zoo: ZooPaths, adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    # A template that renders differently gives a different prompt, so different tokens.
    folder = tmp_path / "templated"
    folder.mkdir()
    for item in adapters[0].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / CHAT_TEMPLATE_FILE).write_text(
        "{{ '<|system|>\nAnswer briefly.<|end|>\n' }}"
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{{ '<|assistant|>\n' }}"
    )
    engine.load_adapter("templated", str(folder), "tiny")
    _, plain = complete(engine, "tiny", "hi")
    _, templated = complete(engine, "templated", "hi")
    assert templated.prompt_tokens > plain.prompt_tokens
    engine.unload_adapter("templated")


def test_the_serving_check(zoo: ZooPaths, tmp_path: Path) -> None:
    architecture = model_architecture(str(zoo.aligned))
    assert architecture == "LlamaForCausalLM"
    plain = make_adapter(zoo, tmp_path / "plain", 1)
    ok = serving_check(plain, architecture)
    assert ok.vllm_loadable and ok.problems == () and ok.rank == 8
    saved = make_adapter(zoo, tmp_path / "saved", 1, modules_to_save=["lm_head"])
    refused = serving_check(saved, architecture)
    assert not refused.vllm_loadable
    assert any("modules_to_save" in p for p in refused.problems)
    dora = serving_check(make_adapter(zoo, tmp_path / "dora", 1, use_dora=True), architecture)
    assert any("DoRA" in p for p in dora.problems)
    assert not serving_check(plain, architecture, max_lora_rank=1).vllm_loadable
    unknown = serving_check(plain, "SomethingElseForCausalLM")
    assert not unknown.vllm_loadable and "not in this check" in unknown.problems[0]
