"""ChatML and the Qwen family (Qwen2.5, Qwen3 with thinking), tool calls in Hermes style.

Jinja text is written with every output in an expression (``{{- '...' }}``) and whitespace control on
every tag, so the physical layout of the template never leaks into the rendered text.
"""
from pronghorn.data.templates import OLLAMA_JSON_ARGS

CHATML = r"""
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

_TOOLS_PREAMBLE = (
    r"# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    r"You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_POSTAMBLE = (
    r"\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    r"<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    r"<args-json-object>}\n</tool_call>"
)

# A tool result is shown to the model as a user turn; consecutive results share one turn.
_TOOL_RESULT = r"""
{%- if loop.first or turns[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
{%- if loop.last or turns[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
"""

_TOOL_CALL = r"""
{%- set fn = call.function if call.function is defined else call -%}
{{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
{{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}
{{- '}\n</tool_call>' -}}
"""

QWEN25 = (r"""
{%- if messages and messages[0].role == 'system' -%}
{%- set system_text = messages[0].content -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system_text = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -%}
{%- set turns = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_text -}}
{%- if tools -%}
{{- '\n\n""" + _TOOLS_PREAMBLE + r"""' -}}
{%- for tool in tools -%}{{- '\n' + tool | tojson -}}{%- endfor -%}
{{- '""" + _TOOLS_POSTAMBLE + r"""' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in turns -%}
{%- set content = message.content if message.content is string else '' -%}
{%- if message.role == 'tool' -%}""" + _TOOL_RESULT + r"""
{%- elif message.role == 'assistant' and message.tool_calls -%}
{{- '<|im_start|>assistant' -}}
{%- if content -%}{{- '\n' + content -}}{%- endif -%}
{%- for call in message.tool_calls -%}{{- '\n' -}}""" + _TOOL_CALL + r"""{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""").strip()

# Qwen3: the reasoning of assistant turns before the last real user query is dropped; the turns after it
# keep (or, for the final turn, always get) a <think> block. `enable_thinking=False` at generation
# pre-fills an empty think block so the model answers directly.
QWEN3 = (r"""
{%- if messages and messages[0].role == 'system' -%}
{%- set system_text = messages[0].content -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system_text = none -%}{%- set turns = messages -%}
{%- endif -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if system_text is not none -%}{{- system_text + '\n\n' -}}{%- endif -%}
{{- '""" + _TOOLS_PREAMBLE + r"""' -}}
{%- for tool in tools -%}{{- '\n' + tool | tojson -}}{%- endfor -%}
{{- '""" + _TOOLS_POSTAMBLE + r"""<|im_end|>\n' -}}
{%- elif system_text is not none -%}
{{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' -}}
{%- endif -%}
{%- set state = namespace(last_query=turns | length - 1, searching=true) -%}
{%- for message in turns | reverse -%}
{%- if state.searching and message.role == 'user' and message.content is string
      and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) -%}
{%- set state.searching = false -%}{%- set state.last_query = turns | length - 1 - loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{%- for message in turns -%}
{%- set content = message.content if message.content is string else '' -%}
{%- if message.role == 'user' or message.role == 'system' -%}
{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{%- if message.reasoning_content is string -%}
{%- set reasoning = message.reasoning_content -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- else -%}
{%- set reasoning = '' -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' -}}
{%- if loop.index0 > state.last_query and (loop.last or reasoning) -%}
{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') -}}
{%- else -%}
{{- content -}}
{%- endif -%}
{%- for call in message.tool_calls or [] -%}
{%- if not loop.first or content -%}{{- '\n' -}}{%- endif -%}""" + _TOOL_CALL + r"""{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}""" + _TOOL_RESULT + r"""
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
""").strip()

OLLAMA_CHATML_TURNS = """\
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

_QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _ollama_qwen(qwen3: bool) -> str:
    """Ollama form of Qwen2.5 (always a system turn, with a default text) or Qwen3 (a system turn only when
    there is a system message or tools; the assistant turns after the last user query carry a think block,
    an empty one when the turn has no reasoning and is the last)."""
    if qwen3:
        system_open = ("{{- if or .System .Tools }}<|im_start|>system\n"
                       "{{ if .System }}{{ .System }}{{ if .Tools }}\n\n{{ end }}{{ end }}")
        system_close = "<|im_end|>\n{{ end }}"
        tools_lead = ""
    else:
        system_open = ("<|im_start|>system\n{{ if .System }}{{ .System }}{{ else }}" + _QWEN25_DEFAULT_SYSTEM
                       + "{{ end }}")
        system_close = "<|im_end|>\n"
        tools_lead = "\n\n"
    call = """<tool_call>
{"name": "{{ .Function.Name }}", "arguments": """ + OLLAMA_JSON_ARGS + """}
</tool_call>"""
    if qwen3:
        assistant = """
{{ if and (gt $i $lastQuery) (or $last .Thinking) }}<think>
{{ .Thinking }}
</think>

{{ end }}{{ .Content }}{{ $content := .Content }}{{ range $j, $_ := .ToolCalls }}{{ if or $j $content }}
{{ end }}""" + call + "{{ end }}"
    else:
        assistant = """{{ if .ToolCalls }}{{ if .Content }}
{{ .Content }}{{ end }}{{ range .ToolCalls }}
""" + call + """{{ end }}{{ else }}
{{ .Content }}{{ end }}"""
    return (system_open + """{{- if .Tools }}""" + tools_lead + """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end }}""" + system_close + """{{ $lastQuery := -1 }}
{{- range $i, $_ := .Messages }}{{ if eq .Role "user" }}{{ $lastQuery = $i }}{{ end }}{{ end }}
{{- $prev := "" }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant""" + assistant + """{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}
<tool_response>
{{ .Content }}
</tool_response>{{ if or $last (ne (index (slice $.Messages $i) 1).Role "tool") }}<|im_end|>
{{ end }}
{{- end }}{{ $prev = .Role }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}""")


_CHATML_PARTS = dict(
    eos_token="<|im_end|>", stop_tokens=("<|im_end|>", "<|im_start|>"), end_part="<|im_end|>",
    response_part="<|im_start|>assistant\n", instruction_part="<|im_start|>user\n",
    other_parts=("<|im_start|>system\n", "<|im_start|>tool\n"),
)

SPECS = (
    dict(name="chatml", jinja=CHATML, ollama_template=OLLAMA_CHATML_TURNS,
         ollama_params={"temperature": 0.7, "top_p": 0.9}, aliases=("chat-ml",),
         source="ChatML as used by OpenAI/Qwen/OpenHermes: <|im_start|>{role}\\n{content}<|im_end|>\\n",
         **_CHATML_PARTS),
    dict(name="qwen-2.5", jinja=QWEN25, ollama_template=_ollama_qwen(qwen3=False), tool_format="hermes",
         ollama_params={"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repeat_penalty": 1.05},
         aliases=("qwen2.5", "qwen-2", "qwen2", "qwen25", "qwen-2.5-coder"),
         source="Qwen/Qwen2.5-7B-Instruct tokenizer_config.json chat_template", **_CHATML_PARTS),
    dict(name="qwen-3", jinja=QWEN3, ollama_template=_ollama_qwen(qwen3=True), tool_format="hermes",
         ollama_params={"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
         aliases=("qwen3", "qwen-3-thinking"),
         source="Qwen/Qwen3-8B tokenizer_config.json chat_template", **_CHATML_PARTS),
)
