"""A tiny random GLM-4 (``Glm4ForCausalLM``, the GLM-4-0414 architecture) with a byte-level BPE
tokenizer trained here and GLM-4's chat format: ``[gMASK]<sop>``, ``<|system|>`` / ``<|user|>`` /
``<|assistant|>`` / ``<|observation|>`` turns, tools listed in the system turn, and calls written
as the function's name on a line followed by its JSON arguments. No download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_fixtures import _corpus

GLM_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

# GLM-4-0414's template, with OpenAI-style assistant tool_calls and tool results rendered in its
# own format (name line + JSON arguments; <|observation|> for results).
GLM4_TEMPLATE = """\
[gMASK]<sop>
{%- if tools -%}
<|system|>
# 可用工具
{% for tool in tools %}
{%- set function = tool.function if tool.function is defined else tool %}

## {{ function.name }}

{{ function | tojson(indent=4) }}
在调用上述函数时，请使用 Json 格式表示调用的参数。
{%- endfor %}
{%- endif -%}
{%- for msg in messages %}
{%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
{%- endif %}
{%- endfor %}
{%- for message in messages if message.role != 'system' %}
{%- if message.role == 'user' %}
<|user|>
{{ message.content }}
{%- elif message.role == 'assistant' %}
{%- if message.content %}
<|assistant|>
{{ message.content }}
{%- endif %}
{%- for tc in message.tool_calls or [] %}
{%- set f = tc.function if tc.function is defined else tc %}
<|assistant|>{{ f.name }}
{% if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}
{%- endfor %}
{%- elif message.role in ['tool', 'observation'] %}
<|observation|>
{{ message.content }}
{%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def build_glm4(out_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               seed: int = 2) -> Path:
    """The tiny GLM-4 in ``out_dir``: head_dim 16, half of it rotary (GLM's partial, interleaved
    rotary embedding), biased q/k/v, and the extra norms after attention and after the MLP."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, Glm4Config, Glm4ForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=GLM_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    template_text = "可用工具 在调用上述函数时，请使用 Json 格式表示调用的参数。"
    tok.train_from_iterator([*_corpus(), template_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=2048)
    fast.chat_template = GLM4_TEMPLATE
    fast.save_pretrained(str(out_dir))
    ids: dict[str, Any] = {t: fast.convert_tokens_to_ids(t) for t in GLM_SPECIALS}
    torch.manual_seed(seed)
    config = Glm4Config(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        head_dim=hidden // heads, partial_rotary_factor=0.5, attention_bias=True,
                        max_position_embeddings=2048, pad_token_id=ids["<|endoftext|>"],
                        eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
                        initializer_range=0.2, tie_word_embeddings=False)
    model = Glm4ForCausalLM(config)
    model.eval()
    model.save_pretrained(str(out_dir))
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=ids["<|endoftext|>"]).save_pretrained(str(out_dir))
    return out_dir
