"""A tiny random GLM-4 (``Glm4ForCausalLM``, the GLM-4-0414 architecture) with a byte-level BPE
tokenizer trained here and GLM-4's chat format: ``[gMASK]<sop>``, ``<|system|>`` / ``<|user|>`` /
``<|assistant|>`` / ``<|observation|>`` turns, tools listed in the system turn, and calls written
as the function's name on a line followed by its JSON arguments. Also a tiny random GLM-4.5
(``Glm4MoeForCausalLM``) with GLM-4.5's own chat template (``<tool_call>`` with ``<arg_key>`` /
``<arg_value>`` pairs, ``<think>`` blocks). No download."""

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


# GLM-4.5's chat template (zai-org/GLM-4.5, as llama.cpp's Jinja engine renders it: plain tojson)
GLM45_TEMPLATE = """\
[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call>{%- endif -%}
{%- macro visible_text(content) -%}
    {%- if content is string -%}
        {{- content }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for item in content -%}
            {%- if item is mapping and item.type == 'text' -%}
                {{- item.text }}
            {%- elif item is string -%}
                {{- item }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- content }}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user_index=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}
        {% set ns.last_user_index = loop.index0 -%}
    {%- endif %}
{%- endfor %}
{% for m in messages %}
{%- if m.role == 'user' -%}<|user|>
{%- set user_content = visible_text(m.content) -%}
{{ user_content }}
{%- if enable_thinking is defined and not enable_thinking -%}
{%- if not user_content.endswith("/nothink") -%}
{{- '/nothink' -}}
{%- endif -%}
{%- endif -%}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{%- set reasoning_content = '' %}
{%- set content = visible_text(m.content) %}
{%- if m.reasoning_content is string %}
    {%- set reasoning_content = m.reasoning_content %}
{%- else %}
    {%- if '</think>' in content %}
        {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
{%- endif %}
{%- if loop.index0 > ns.last_user_index and reasoning_content -%}
{{ '\\n<think>' + reasoning_content.strip() +  '</think>'}}
{%- else -%}
{{ '\\n<think></think>' }}
{%- endif -%}
{%- if content.strip() -%}
{{ '\\n' + content.strip() }}
{%- endif -%}
{% if m.tool_calls %}
{% for tc in m.tool_calls %}
{%- if tc.function %}
    {%- set tc = tc.function %}
{%- endif %}
{{ '\\n<tool_call>' + tc.name }}
{% set _args = tc.arguments %}
{% for k, v in _args.items() %}
<arg_key>{{ k }}</arg_key>
<arg_value>{{ v | tojson if v is not string else v }}</arg_value>
{% endfor %}
</tool_call>{% endfor %}
{% endif %}
{%- elif m.role == 'tool' -%}
{%- if m.content is string -%}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
    {{- '<|observation|>' }}
{%- endif %}
{{- '\\n<tool_response>\\n' }}
{{- m.content }}
{{- '\\n</tool_response>' }}
{%- else -%}
<|observation|>{% for tr in m.content %}

<tool_response>
{{ tr.output if tr.output is defined else tr }}
</tool_response>{% endfor -%}
{% endif -%}
{%- elif m.role == 'system' -%}
<|system|>
{{ visible_text(m.content) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    <|assistant|>{{- '\\n<think></think>' if (enable_thinking is defined and not enable_thinking) else '' -}}
{%- endif -%}"""

# GLM-4.5's markup tokens: added to its vocabulary but not special, so decoded text keeps them
GLM45_TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
              "</arg_value>", "<tool_response>", "</tool_response>"]


def _glm_tokenizer(out_dir: Path, template: str, tags: list[str] | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

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
    if tags:
        fast.add_tokens(tags)
    fast.chat_template = template
    fast.save_pretrained(str(out_dir))
    return fast


def build_glm4(out_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               seed: int = 2) -> Path:
    """The tiny GLM-4 in ``out_dir``: head_dim 16, half of it rotary (GLM's partial, interleaved
    rotary embedding), biased q/k/v, and the extra norms after attention and after the MLP."""
    import torch
    from transformers import GenerationConfig, Glm4Config, Glm4ForCausalLM

    fast = _glm_tokenizer(out_dir, GLM4_TEMPLATE)
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


def build_glm45(out_dir: Path, seed: int = 3) -> Path:
    """The tiny GLM-4.5 in ``out_dir``: GLM-4.5's mixture of experts (one dense layer, then 4
    routed experts, 2 per token, and a shared one; sigmoid routing) at hidden size 64, with
    GLM-4.5's template. Its turn ends with ``<|user|>`` or ``<|observation|>``, as GLM-4.5's does."""
    import torch
    from transformers import GenerationConfig, Glm4MoeConfig, Glm4MoeForCausalLM

    fast = _glm_tokenizer(out_dir, GLM45_TEMPLATE, GLM45_TAGS)
    ids: dict[str, Any] = {t: fast.convert_tokens_to_ids(t) for t in GLM_SPECIALS}
    torch.manual_seed(seed)
    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    config = Glm4MoeConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, partial_rotary_factor=0.5,
                           attention_bias=True, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                           n_shared_experts=1, first_k_dense_replace=1, num_nextn_predict_layers=0,
                           max_position_embeddings=2048, pad_token_id=ids["<|endoftext|>"], eos_token_id=eos,
                           initializer_range=0.2, tie_word_embeddings=False)
    model = Glm4MoeForCausalLM(config).eval()
    model.save_pretrained(str(out_dir))
    GenerationConfig(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"]).save_pretrained(str(out_dir))
    return out_dir
