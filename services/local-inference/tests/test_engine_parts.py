"""The engine-independent pieces: validation, prompt preparation, stop handling,
settings, hardware facts and the lazily imported vLLM engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hoosh_inference import hardware
from hoosh_inference.config import DEFAULT_MODEL_ID, InferenceSettings, bundled_gguf
from hoosh_inference.engine import (
    ImagePart,
    Message,
    SamplingOptions,
    StopMatcher,
    TextPart,
    ToolCall,
    check_model,
    resolve_max_tokens,
    template_messages,
    validate_sampling,
)
from hoosh_inference.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from hoosh_inference.llama_engine import LlamaEngine


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_sequence_spanning_pieces_is_never_emitted() -> None:
    matcher = StopMatcher(("END",))
    emitted = []
    for piece in ["Hello E", "N", "D and more"]:
        text, stopped = matcher.feed(piece)
        emitted.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(emitted) == "Hello "
    assert emitted[:2] == ["Hello ", ""]  # "E" and "N" were held back


def test_held_text_is_released_when_it_is_not_a_stop() -> None:
    assert feed_all(StopMatcher(("END",)), ["Hello E", "N", "OUGH"]) == ("Hello ENOUGH", False)
    assert feed_all(StopMatcher(("END",)), ["tail E"]) == ("tail E", False)
    assert feed_all(StopMatcher(()), ["a", "b"]) == ("ab", False)


def test_earliest_of_several_stops_wins() -> None:
    assert feed_all(StopMatcher(("zz", "b")), ["a", "bzz"]) == ("a", True)


def test_sampling_ranges_are_validated() -> None:
    validate_sampling(SamplingOptions(max_tokens=1, temperature=0, top_p=1, stop=("x",)))
    for bad, param in [
        (SamplingOptions(max_tokens=0), "max_tokens"),
        (SamplingOptions(temperature=2.5), "temperature"),
        (SamplingOptions(top_p=0), "top_p"),
        (SamplingOptions(presence_penalty=-3), "presence_penalty"),
        (SamplingOptions(frequency_penalty=float("nan")), "frequency_penalty"),
        (SamplingOptions(stop=("a", "b", "c", "d", "e")), "stop"),
        (SamplingOptions(stop=("",)), "stop"),
    ]:
        with pytest.raises(InvalidRequest) as refused:
            validate_sampling(bad)
        assert refused.value.param == param


def test_max_tokens_is_resolved_against_the_context_window() -> None:
    assert resolve_max_tokens(100, None, 2048) == 1948
    assert resolve_max_tokens(100, 1948, 2048) == 1948
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 2048 tokens"):
        resolve_max_tokens(100, 1949, 2048)
    with pytest.raises(ContextLengthExceeded, match="2049 tokens"):
        resolve_max_tokens(2049, None, 2048)


def test_messages_become_template_dicts() -> None:
    dicts = template_messages(
        (
            Message("developer", "Be brief."),
            Message("user", (TextPart("a"), TextPart("b"))),
            Message("assistant", None, tool_calls=(ToolCall(id="c1", name="f", arguments="{}"),)),
            Message("tool", "42", tool_call_id="c1"),
        ),
        "m",
    )
    assert dicts[0] == {"role": "system", "content": "Be brief."}
    assert dicts[1] == {"role": "user", "content": "a\nb"}
    assert dicts[2]["content"] == ""
    assert dicts[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert dicts[3] == {"role": "tool", "content": "42", "tool_call_id": "c1"}


def test_images_unknown_roles_and_empty_conversations_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="image"):
        template_messages((Message("user", (ImagePart(url="http://x/y.png"),)),), "m")
    with pytest.raises(InvalidRequest, match="role"):
        template_messages((Message("wizard", "hi"),), "m")
    with pytest.raises(InvalidRequest, match="at least one"):
        template_messages((), "m")


def test_model_ids_are_checked() -> None:
    check_model("m", "m")
    check_model("", "m")  # empty means the served model
    with pytest.raises(ModelNotFound):
        check_model("other", "m")


def test_prompt_uses_the_models_own_chat_template(engine: LlamaEngine) -> None:
    prompt = engine.render_prompt((Message("system", "You are terse."), Message("user", "Hi!")))
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without a system turn SmolLM2's template adds its own default one.
    assert engine.render_prompt((Message("user", "Hi!"),)).startswith("<|im_start|>system\n")


def test_settings_defaults_and_fail_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    names = ("ENGINE", "MODEL_PATH", "VLLM_MODEL", "LISTEN", "METRICS_LISTEN", "MODEL_ID", "N_CTX", "MAX_QUEUE")
    for name in (*names, "THREADS"):
        monkeypatch.delenv(f"HOOSH_INFERENCE_{name}", raising=False)
    settings = InferenceSettings()
    assert settings.listen == "127.0.0.1:50053"
    assert settings.metrics_listen == "127.0.0.1:9463"
    assert settings.engine == "auto"
    assert settings.model_id == DEFAULT_MODEL_ID
    assert settings.n_ctx == 2048
    assert settings.max_queue == 64
    assert settings.threads is None
    assert settings.gguf_path() == bundled_gguf()
    monkeypatch.setenv("HOOSH_INFERENCE_METRICS_LISTEN", "")
    assert InferenceSettings().metrics_listen == ""  # not served
    monkeypatch.delenv("HOOSH_INFERENCE_METRICS_LISTEN")

    monkeypatch.setenv("HOOSH_INFERENCE_MODEL_PATH", str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="does not name a file"):
        InferenceSettings()
    monkeypatch.delenv("HOOSH_INFERENCE_MODEL_PATH")
    monkeypatch.setenv("HOOSH_INFERENCE_ENGINE", "vllm")
    with pytest.raises(ValueError, match="HOOSH_INFERENCE_VLLM_MODEL"):
        InferenceSettings()
    monkeypatch.setenv("HOOSH_INFERENCE_ENGINE", "tensorflow")
    with pytest.raises(ValueError):
        InferenceSettings()


def test_engine_choice() -> None:
    choose = hardware.choose_engine
    assert choose("auto", has_gpu=True, vllm_available=True, vllm_model="org/m") == "vllm"
    assert choose("auto", has_gpu=False, vllm_available=True, vllm_model="org/m") == "llama.cpp"
    assert choose("auto", has_gpu=True, vllm_available=False, vllm_model="org/m") == "llama.cpp"
    assert choose("auto", has_gpu=True, vllm_available=True, vllm_model="") == "llama.cpp"
    assert choose("vllm", has_gpu=False, vllm_available=False, vllm_model="") == "vllm"
    assert choose("llama.cpp", has_gpu=True, vllm_available=True, vllm_model="org/m") == "llama.cpp"


def test_hardware_probe_never_fails() -> None:
    info = hardware.probe()
    assert info.cpu_count >= 1
    for gpu in info.gpus:
        assert gpu.name
        assert gpu.memory_total_bytes >= gpu.memory_free_bytes >= 0


def test_vllm_engine_module_does_not_import_vllm() -> None:
    # A fresh interpreter, so nothing imported by other tests can hide an eager import.
    code = (
        "import sys\n"
        "from hoosh_inference.vllm_engine import VllmEngine, sampling_kwargs\n"
        "from hoosh_inference.engine import SamplingOptions\n"
        "assert 'vllm' not in sys.modules\n"
        "kw = sampling_kwargs(SamplingOptions(stop=('x',), seed=3), 10)\n"
        "assert kw['max_tokens'] == 10 and kw['temperature'] == 1.0 and kw['top_p'] == 1.0\n"
        "assert kw['stop'] == ['x'] and kw['seed'] == 3 and kw['n'] == 1\n"
        "assert 'vllm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
