"""Llama 3 and Llama 3.1/3.2/3.3 (with JSON tool calls and ``ipython`` tool results)."""
from pronghorn.data.templates import OLLAMA_JSON_ARGS

LLAMA3 = r"""
{%- for message in messages -%}
{%- if loop.first -%}{{- bos_token -}}{%- endif -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
""".strip()

_TOOL_INSTRUCTIONS = (
    r"""'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'"""
    r""" + 'Do not use variables.\n\n'"""
)

# Llama 3.1 always opens with a system header carrying the knowledge-cutoff and date lines. Custom tools
# go into the first user turn by default (tools_in_user_message), as Meta's reference format does. A tool
# result is an `ipython` turn whose content is JSON-encoded (strings included), as in Meta's template.
LLAMA31 = (r"""
{{- bos_token -}}
{%- set tools = custom_tools if custom_tools is defined else (tools if tools is defined else none) -%}
{%- set tools_in_user = tools_in_user_message if tools_in_user_message is defined else true -%}
{%- set today = date_string if date_string is defined else '26 Jul 2024' -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_text = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system_text = '' -%}{%- set turns = messages -%}
{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{%- if builtin_tools is defined or tools is not none -%}{{- 'Environment: ipython\n' -}}{%- endif -%}
{%- if builtin_tools is defined -%}
{{- 'Tools: ' + builtin_tools | reject('equalto', 'code_interpreter') | join(', ') + '\n\n' -}}
{%- endif -%}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + today + '\n\n' -}}
{%- if tools is not none and not tools_in_user -%}
{{- 'You have access to the following functions. To call a function, please respond with JSON for a function call.' -}}
{{- """ + _TOOL_INSTRUCTIONS + r""" -}}
{%- for tool in tools -%}{{- tool | tojson(indent=4) + '\n\n' -}}{%- endfor -%}
{%- endif -%}
{{- system_text + '<|eot_id|>' -}}
{%- if tools is not none and tools_in_user -%}
{%- if not turns -%}{{- raise_exception('Llama 3.1 puts tools in the first user message, but there is none') -}}{%- endif -%}
{{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n' -}}
{{- """ + _TOOL_INSTRUCTIONS + r""" -}}
{%- for tool in tools -%}{{- tool | tojson(indent=4) + '\n\n' -}}{%- endfor -%}
{{- turns[0]['content'] | trim + '<|eot_id|>' -}}
{%- set turns = turns[1:] -%}
{%- endif -%}
{%- for message in turns -%}
{%- if message['role'] == 'tool' or message['role'] == 'ipython' -%}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' -}}
{{- message['content'] | tojson if message['content'] is mapping or message['content'] is iterable else message['content'] -}}
{{- '<|eot_id|>' -}}
{%- elif message['tool_calls'] is defined and message['tool_calls'] -%}
{%- if message['tool_calls'] | length != 1 -%}{{- raise_exception('Llama 3.1 supports one tool call per assistant turn') -}}{%- endif -%}
{%- set call = message['tool_calls'][0] -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- if builtin_tools is defined and fn['name'] in builtin_tools -%}
{{- '<|python_tag|>' + fn['name'] + '.call(' -}}
{%- for arg_name, arg_val in fn['arguments'] | items -%}
{{- arg_name + '="' + arg_val + '"' -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
{%- endfor -%}
{{- ')' -}}
{%- else -%}
{{- '{"name": "' + fn['name'] + '", "parameters": ' + fn['arguments'] | tojson + '}' -}}
{%- endif -%}
{{- '<|eom_id|>' if builtin_tools is defined else '<|eot_id|>' -}}
{%- else -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
""").strip()

_OLLAMA_LLAMA3 = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

# The date line is the Jinja template's default, so Ollama prompts match what the model was tuned on.
_OLLAMA_LLAMA31 = """\
<|start_header_id|>system<|end_header_id|>

{{ if .Tools }}Environment: ipython
{{ end }}Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ if .System }}{{ .System }}{{ end }}<|eot_id|>
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ if and $.Tools $last }}Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.

{{ range $.Tools }}{{ . }}

{{ end }}{{ end }}{{ .Content }}<|eot_id|>
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": """ + OLLAMA_JSON_ARGS + """}{{ end }}
{{- else }}{{ .Content }}{{ end }}{{ if not $last }}<|eot_id|>{{ end }}
{{- else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>

{{ json .Content }}<|eot_id|>
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

_LLAMA_PARTS = dict(
    eos_token="<|eot_id|>", end_part="<|eot_id|>",
    response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
    other_parts=("<|start_header_id|>system<|end_header_id|>\n\n", "<|start_header_id|>ipython<|end_header_id|>\n\n",
                 "<|start_header_id|>tool<|end_header_id|>\n\n"),
)

SPECS = (
    dict(name="llama-3", jinja=LLAMA3, ollama_template=_OLLAMA_LLAMA3,
         stop_tokens=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
         ollama_params={"temperature": 0.6, "top_p": 0.9}, aliases=("llama3", "llama-3-instruct"),
         source="meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json chat_template", **_LLAMA_PARTS),
    dict(name="llama-3.1", jinja=LLAMA31, ollama_template=_OLLAMA_LLAMA31, tool_format="llama",
         stop_tokens=("<|eot_id|>", "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>"),
         ollama_params={"temperature": 0.6, "top_p": 0.9},
         aliases=("llama3.1", "llama-31", "llama-3.2", "llama3.2", "llama-3.3", "llama3.3"),
         source="meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json chat_template", **_LLAMA_PARTS),
)
