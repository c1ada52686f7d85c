"""coma's embedding input as a chat template, for tools that build model inputs from chat messages.

sentence-transformers (≥ 5.4) renders every input through the processor's chat template, and vLLM's pooling runner
renders ``messages`` requests the same way. This template reproduces :func:`coma.compression.embedding_text`
exactly: the user text (an orphan image placeholder dropped), a system message as the instruction before it, the
image block in place of the placeholder or first on its own line, then the T compression tokens. It accepts image
parts as transformers and sentence-transformers write them (``{"type": "image"}``) and as OpenAI clients send them
(``{"type": "image_url"}``). Everything model-specific is written into the template as literals.
"""

from __future__ import annotations

import json

from coma.config import ComaConfig

# Jinja, with the literals substituted by ``embedding_chat_template`` (json.dumps gives valid Jinja string literals).
_TEMPLATE = """\
{%- set placeholder = @PLACEHOLDER@ -%}
{%- macro without_placeholder(text) -%}
{#- the placeholder, the spaces after it and one newline (coma.data.formats.drop_orphan_placeholder) -#}
{%- set pieces = text.split(placeholder) -%}
{{- pieces[0] -}}
{%- for piece in pieces[1:] -%}
{%- set rest = piece.lstrip(' \\t') -%}
{{- rest[1:] if rest.startswith('\\n') else rest -}}
{%- endfor -%}
{%- endmacro -%}
{%- set ns = namespace(instruction='', text='', images=0) -%}
{%- for message in messages -%}
{%- if message['content'] is string and message['role'] == 'system' -%}
{%- set ns.instruction = ns.instruction ~ message['content'] -%}
{%- elif message['content'] is string -%}
{%- set ns.text = ns.text ~ message['content'] -%}
{%- else -%}
{#- a plain loop over message['content']: vLLM reads it to choose the "openai" content format -#}
{%- for part in message['content'] -%}
{%- if part['type'] == 'text' and message['role'] == 'system' -%}
{%- set ns.instruction = ns.instruction ~ part['text'] -%}
{%- elif part['type'] == 'text' -%}
{%- set ns.text = ns.text ~ part['text'] -%}
{%- elif part['type'] in ['image', 'image_url'] -%}
{%- set ns.images = ns.images + 1 -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endfor -%}
{%- if ns.images > 1 -%}
{{- raise_exception('coma embeds one image per input, got ' ~ ns.images) -}}
{%- endif -%}
{%- set text = ns.text if ns.images else without_placeholder(ns.text) -%}
{%- if ns.instruction -%}
{%- set text = (ns.instruction ~ '\\n' ~ text) if text else ns.instruction -%}
{%- endif -%}
{%- if ns.images -%}
{%- if placeholder not in text -%}
{%- set text = (placeholder ~ '\\n' ~ text) if text else placeholder -%}
{%- endif -%}
{%- if text.count(placeholder) > 1 -%}
{{- raise_exception('input text has more than one image placeholder ' ~ placeholder) -}}
{%- endif -%}
{{- text.replace(placeholder, @IMAGE_BLOCK@) -}}
{%- else -%}
{{- without_placeholder(text) -}}
{%- endif -%}
{{- @COMPRESSION_TOKENS@ -}}
"""


def embedding_chat_template(config: ComaConfig, image_block: str) -> str:
    """The Jinja chat template that renders one embedding input the way coma builds it."""
    literals = {
        "@PLACEHOLDER@": config.image_placeholder,
        "@IMAGE_BLOCK@": image_block,
        "@COMPRESSION_TOKENS@": "".join(config.token_strings),
    }
    template = _TEMPLATE
    for marker, value in literals.items():
        template = template.replace(marker, json.dumps(value))
    return template
