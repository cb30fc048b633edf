"""Phi-3 / Phi-3.5 (``<|user|>`` ... ``<|end|>``) and Phi-4 (ChatML with ``<|im_sep|>``).

Phi-3.5's published template appends the tokenizer's EOS after the last turn when no generation prompt
is asked for; we leave it out because ``<|end|>`` already ends every turn and, once ``<|end|>`` is mapped
onto the EOS, the published form would write it twice.
"""

PHI3 = r"""
{%- for message in messages -%}
{%- if message['role'] == 'system' and message['content'] -%}{{- '<|system|>\n' + message['content'] + '<|end|>\n' -}}
{%- elif message['role'] == 'user' -%}{{- '<|user|>\n' + message['content'] + '<|end|>\n' -}}
{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>\n' + message['content'] + '<|end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}
""".strip()

PHI4 = r"""
{%- for message in messages -%}
{%- if message['role'] in ['system', 'user', 'assistant'] -%}
{{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant<|im_sep|>' -}}{%- endif -%}
""".strip()

_OLLAMA_PHI3 = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|{{ .Role }}|>
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""

_OLLAMA_PHI4 = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant<|im_sep|>{{ end }}
{{- end }}"""

SPECS = (
    dict(name="phi-3", jinja=PHI3, eos_token="<|end|>", end_part="<|end|>",
         stop_tokens=("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>"),
         response_part="<|assistant|>\n", instruction_part="<|user|>\n", other_parts=("<|system|>\n",),
         ollama_template=_OLLAMA_PHI3, ollama_params={"temperature": 0.7},
         aliases=("phi3", "phi-3.5", "phi3.5", "phi-35"),
         source="microsoft/Phi-3.5-mini-instruct chat_template (without the trailing EOS)"),
    dict(name="phi-4", jinja=PHI4, eos_token="<|im_end|>", end_part="<|im_end|>",
         stop_tokens=("<|im_end|>", "<|im_start|>", "<|im_sep|>"),
         response_part="<|im_start|>assistant<|im_sep|>", instruction_part="<|im_start|>user<|im_sep|>",
         other_parts=("<|im_start|>system<|im_sep|>",),
         ollama_template=_OLLAMA_PHI4, ollama_params={"temperature": 0.7}, aliases=("phi4",),
         source="microsoft/phi-4 tokenizer_config.json chat_template"),
)
