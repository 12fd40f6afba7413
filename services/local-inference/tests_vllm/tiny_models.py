"""Tiny model folders made offline, as vLLM reads them: a model config and a tokenizer,
no weights (the engine core that would load them is the stub's).

- ``chatml_model``: a Llama config and a byte-level BPE tokenizer trained here on a few
  sentences, with SmolLM2's ChatML special tokens and a ChatML chat template (the
  Hugging Face tokenizer path: vLLM's ``HfRenderer``).
- ``mistral_model``: a Mistral config, a Tekken tokenizer (``tekken.json``, mistral_common's
  format, byte-level vocabulary, the v7 control tokens) and a ``consolidated.safetensors``
  marker, which together make vLLM (0.33) pick its own ``MistralTokenizer`` and
  ``MistralRenderer`` for the model, as it does for Mistral's published models.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

CORPUS = [
    "Hello world! The capital of France is Paris.",
    "Paris is a city in France. The river there is the Seine.",
    "hi there, how are you? I am fine, thank you.",
    "One two three four five six seven eight nine ten.",
    "The quick brown fox jumps over the lazy dog.",
    "system user assistant: say hi, say bye, stop here STOP.",
]
# The pre-tokenizer pattern of Mistral's Tekken files.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _config(folder: Path, architecture: str, model_type: str, vocab_size: int, bos: int, eos: int) -> None:
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "sliding_window": None,  # MistralConfig's default is 4096; vLLM 0.11's CPU backend refuses one
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def chatml_model(folder: Path) -> Path:
    """A Llama-shaped model whose tokenizer is a Hugging Face fast tokenizer with a
    ChatML template (ids 0, 1, 2: <|endoftext|>, <|im_start|>, <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=CHATML_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    _config(folder, "LlamaForCausalLM", "llama", len(tokenizer), bos=1, eos=2)
    return folder


def mistral_model(folder: Path) -> Path:
    """A Mistral-shaped model with a Tekken tokenizer: the 20 control tokens of
    mistral_common's v7 list (ids 0-19: <unk>, <s>, </s>, [INST], [/INST], ...), then the
    256 bytes (ids 20-275), so any text encodes one id per byte."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    folder.mkdir(parents=True, exist_ok=True)
    special = [dict(token) for token in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    vocab = [
        {
            "rank": i,
            "token_bytes": base64.b64encode(bytes([i])).decode(),
            "token_str": chr(i) if 32 <= i < 127 else None,
        }
        for i in range(256)
    ]
    tekken = {
        "config": {
            "pattern": TEKKEN_PATTERN,
            "num_vocab_tokens": len(vocab),
            "default_vocab_size": len(vocab) + len(special),
            "default_num_special_tokens": len(special),
            "version": "v7",
        },
        "vocab": vocab,
        "special_tokens": special,
        "version": 1,
        "type": "Tekken",
    }
    (folder / "tekken.json").write_text(json.dumps(tekken))
    # vLLM takes a folder for a Mistral-format model when it holds consolidated*.safetensors
    # (and then a tekken.json or tokenizer.model.v* for its Mistral tokenizer). Never read:
    # no weights load with the engine core stubbed.
    (folder / "consolidated.safetensors").write_bytes(b"")
    _config(folder, "MistralForCausalLM", "mistral", len(vocab) + len(special), bos=1, eos=2)
    return folder
