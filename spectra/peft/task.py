"""PEFT's task_type for a base model, inferred from its config.json (`architectures`, `model_type`).

PEFT wraps the model in a task-specific class chosen by task_type; a wrong one fails (CAUSAL_LM on a BERT base
raises AttributeError in get_peft_model), while None gives the plain PeftModel that works on any model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spectra.names import MODEL_CONFIG

log = logging.getLogger(__name__)

TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# model types whose *ForConditionalGeneration / *Model are encoder-decoders (when is_encoder_decoder is not saved)
ENCODER_DECODER = frozenset(
    {"t5", "mt5", "umt5", "longt5", "switch_transformers", "bart", "mbart", "plbart", "pegasus", "pegasus_x"}
    | {"marian", "m2m_100", "nllb-moe", "led", "blenderbot", "blenderbot-small", "bigbird_pegasus", "fsmt"}
    | {"prophetnet", "xlm-prophetnet", "whisper", "speech_to_text", "seamless_m4t", "encoder-decoder"}
)
# architecture name endings -> task type, tried in order (after the encoder-decoder cases)
SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("EncoderModel", "FEATURE_EXTRACTION"),
)
MAX_CONFIG_BYTES = 16 * 2**20


def _read(source: str | Path) -> Mapping[str, Any] | None:
    path = Path(source)
    file = path / MODEL_CONFIG if path.is_dir() else path if path.suffix == ".json" else path.parent / MODEL_CONFIG
    try:
        if not file.is_file() or file.stat().st_size > MAX_CONFIG_BYTES:
            return None
        config = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        log.info("%s: no task type inferred (%s)", file, type(exc).__name__)
        return None
    return config if isinstance(config, dict) else None


def infer_task_type(source: str | Path | Mapping[str, Any]) -> str | None:
    """PEFT task_type for the base model, or None when config.json is missing, unreadable or says nothing known.

    *ForCausalLM -> CAUSAL_LM; an encoder-decoder's *ForConditionalGeneration or *LMHeadModel -> SEQ_2_SEQ_LM
    (a decoder-only one: GPT2LMHeadModel, a vision-language model, -> CAUSAL_LM); *ForSequenceClassification -> SEQ_CLS;
    *ForTokenClassification -> TOKEN_CLS; *ForQuestionAnswering -> QUESTION_ANS; a bare encoder or decoder
    (BertModel, LlamaModel, T5EncoderModel) -> FEATURE_EXTRACTION; anything else (*ForMaskedLM, a bare
    encoder-decoder such as T5Model) -> None, PEFT's plain PeftModel.

    Args:
        source: the base model's folder (its config.json is read), a config.json path, a weights file (the
            config.json beside it), or the parsed config.
    """
    config = source if isinstance(source, Mapping) else _read(source)
    if config is None:
        return None
    architectures = config.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    if not isinstance(name, str):
        return None
    model_type = config.get("model_type")
    encoder_decoder = config.get("is_encoder_decoder") is True or model_type in ENCODER_DECODER
    if name == "EncoderDecoderModel":
        return "SEQ_2_SEQ_LM"
    if name.endswith(("ForConditionalGeneration", "LMHeadModel")):  # T5WithLMHeadModel is an old T5 name
        return "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"
    for suffix, task in SUFFIXES:
        if name.endswith(suffix):
            return task
    if name.endswith("Model") and not name.endswith("PreTrainedModel"):
        return None if encoder_decoder else "FEATURE_EXTRACTION"
    return None
