"""Gemma, Gemma 2 and Gemma 3 (``<start_of_turn>user|model``), with Gemma-style function calling.

Gemma has no system role: a system message is folded into the first user turn followed by a blank line
(Gemma 3's published behaviour; Gemma 1/2's official templates reject a system message instead, and we
fold it the same way so one dataset works across the family).

Function calling follows Google's prompt-based recipe for Gemma: the tool list goes into the first user
turn, the model answers with a Python-style call in a ```tool_code``` fence, and results come back in a
user turn inside a ```tool_output``` fence.
"""

_TOOLS_BLOCK = (
    r"You have access to the following functions. To call one, reply with a Python function call "
    r"inside a ```tool_code``` block, for example:\n```tool_code\nfunction_name(argument=value)\n```\n\n"
    r"Available functions:\n"
)

GEMMA = (r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_prefix = (messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text']) | trim + '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- else -%}
{%- set first_prefix = '' -%}{%- set turns = messages -%}
{%- endif -%}
{%- if tools -%}
{%- set tool_text = namespace(value='""" + _TOOLS_BLOCK + r"""') -%}
{%- for tool in tools -%}{%- set tool_text.value = tool_text.value + tool | tojson + '\n' -%}{%- endfor -%}
{%- set first_prefix = first_prefix + tool_text.value + '\n' -%}
{%- endif -%}
{%- for message in turns -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- if role == 'tool' -%}
{%- if loop.first or turns[loop.index0 - 1]['role'] != 'tool' -%}{{- '<start_of_turn>user\n' -}}{%- else -%}{{- '\n' -}}{%- endif -%}
{{- '```tool_output\n' + (message['content'] if message['content'] is string else message['content'] | tojson) | trim + '\n```' -}}
{%- if loop.last or turns[loop.index0 + 1]['role'] != 'tool' -%}{{- '<end_of_turn>\n' -}}{%- endif -%}
{%- else -%}
{{- '<start_of_turn>' + role + '\n' + (first_prefix if loop.first else '') -}}
{%- if message['content'] is string -%}
{{- message['content'] | trim -}}
{%- elif message['content'] is iterable -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' -%}{{- '<start_of_image>' -}}{%- elif part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- if message['tool_calls'] is defined and message['tool_calls'] -%}
{%- for call in message['tool_calls'] -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{%- if not loop.first or message['content'] -%}{{- '\n' -}}{%- endif -%}
{{- '```tool_code\n' + fn['name'] + '(' -}}
{%- for key, value in fn['arguments'] | items -%}{{- key + '=' + value | tojson -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}
{{- ')\n```' -}}
{%- endfor -%}
{%- endif -%}
{{- '<end_of_turn>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}
""").strip()

# Gemma 1 and 2 use the same turn format as Gemma 3 (text only); one template serves all three. A leading
# system message is folded into the next turn, as the Jinja template does.
_OLLAMA_GEMMA = """\
{{- $fold := "" }}
{{- if and .Messages (eq (index .Messages 0).Role "system") }}{{ $fold = (index .Messages 0).Content }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $fold (eq $i 1) }}{{ $fold }}

{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ if and $fold (eq $i 1) }}{{ $fold }}

{{ end }}{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- else if eq .Role "tool" }}<start_of_turn>user
```tool_output
{{ .Content }}
```<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- end }}
{{- end }}"""

_GEMMA_PARTS = dict(
    jinja=GEMMA, eos_token="<end_of_turn>", end_part="<end_of_turn>",
    stop_tokens=("<end_of_turn>", "<start_of_turn>"),
    response_part="<start_of_turn>model\n", instruction_part="<start_of_turn>user\n",
    ollama_template=_OLLAMA_GEMMA,
)

SPECS = (
    dict(name="gemma", aliases=("gemma-1", "gemma-1.1", "gemma-it"), ollama_params={"temperature": 0.7},
         tool_format="gemma",
         source="google/gemma-1.1-7b-it chat_template (system folded into first user turn)", **_GEMMA_PARTS),
    dict(name="gemma-2", aliases=("gemma2",), ollama_params={"temperature": 0.7, "top_p": 0.95}, tool_format="gemma",
         source="google/gemma-2-9b-it chat_template (system folded into first user turn)", **_GEMMA_PARTS),
    dict(name="gemma-3", aliases=("gemma3",), tool_format="gemma",
         ollama_params={"temperature": 1.0, "top_k": 64, "top_p": 0.95, "min_p": 0.0},
         source="google/gemma-3-4b-it chat_template; function calling per ai.google.dev Gemma function-calling guide",
         **_GEMMA_PARTS),
)
