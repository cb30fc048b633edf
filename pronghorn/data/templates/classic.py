"""Plain-text formats from before chat tokens: Alpaca, Vicuna v1.1 and Zephyr.

These end an assistant turn with the tokenizer's own EOS (``eos_token`` in the template), so their
registry entries leave ``eos_token`` unset: the tokenizer keeps its EOS.
"""
from pronghorn.data.templates import OLLAMA_EOS

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

ALPACA = (r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_text = messages[0]['content'] -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system_text = '""" + ALPACA_SYSTEM + r"""' -%}{%- set turns = messages -%}
{%- endif -%}
{%- if system_text -%}{{- system_text + '\n\n' -}}{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}{{- '### Instruction:\n' + message['content'] + '\n\n' -}}
{%- elif message['role'] == 'assistant' -%}{{- '### Response:\n' + message['content'] + eos_token + '\n\n' -}}
{%- else -%}{{- raise_exception('The alpaca template accepts system, user and assistant roles, got ' + message['role']) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}
""").strip()

VICUNA = (r"""
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_text = messages[0]['content'] -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system_text = '""" + VICUNA_SYSTEM.replace("'", "\\'") + r"""' -%}{%- set turns = messages -%}
{%- endif -%}
{%- if system_text -%}{{- system_text + ' ' -}}{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}
{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + message['content'] + eos_token -}}
{%- else -%}{{- raise_exception('The vicuna template accepts system, user and assistant roles, got ' + message['role']) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
""").strip()

ZEPHYR = r"""
{%- for message in messages -%}
{%- if message['role'] in ['system', 'user', 'assistant'] -%}
{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}
""".strip()

# Ollama has no variable for the EOS token, so these templates write a placeholder that the export layer
# replaces with the tokenizer's EOS text (pronghorn.export.ollama.ollama_pieces_for).
_OLLAMA_ALPACA = """\
{{ if .System }}{{ .System }}

{{ else }}""" + ALPACA_SYSTEM + """

{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}### Instruction:
{{ .Content }}

{{ if $last }}### Response:
{{ end }}
{{- else if eq .Role "assistant" }}### Response:
{{ .Content }}{{ if not $last }}""" + OLLAMA_EOS + """

{{ end }}
{{- end }}
{{- end }}"""

_OLLAMA_VICUNA = """\
{{ if .System }}{{ .System }} {{ else }}""" + VICUNA_SYSTEM + """ {{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}USER: {{ .Content }} {{ if $last }}ASSISTANT:{{ end }}
{{- else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}{{ if not $last }}""" + OLLAMA_EOS + """{{ end }}
{{- end }}
{{- end }}"""

_OLLAMA_ZEPHYR = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|{{ .Role }}|>
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}""" + OLLAMA_EOS + """
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|assistant|>
{{ end }}
{{- end }}"""

SPECS = (
    dict(name="alpaca", jinja=ALPACA, eos_token=None, stop_tokens=("### Instruction:", "### Response:"),
         response_part="### Response:\n", instruction_part="### Instruction:\n",
         ollama_template=_OLLAMA_ALPACA, ollama_params={"temperature": 0.7},
         source="tatsu-lab/stanford_alpaca PROMPT_DICT['prompt_no_input'] (turns separated by a blank line)"),
    dict(name="vicuna", jinja=VICUNA, eos_token=None, stop_tokens=("USER:",),
         response_part="ASSISTANT:", instruction_part="USER:",
         ollama_template=_OLLAMA_VICUNA, ollama_params={"temperature": 0.7}, aliases=("vicuna-1.1", "vicuna_v1.1"),
         source="lm-sys/FastChat conversation template 'vicuna_v1.1' (sep ' ', sep2 '</s>')"),
    dict(name="zephyr", jinja=ZEPHYR, eos_token=None, stop_tokens=("<|user|>", "<|system|>"),
         response_part="<|assistant|>\n", instruction_part="<|user|>\n", other_parts=("<|system|>\n",),
         ollama_template=_OLLAMA_ZEPHYR, ollama_params={"temperature": 0.7},
         source="HuggingFaceH4/zephyr-7b-beta tokenizer_config.json chat_template"),
)
