"""Mistral instruct formats: v1 (SentencePiece, ``[INST] x [/INST]``), v3 (``[INST] x[/INST] y``, tools)
and Tekken (Mistral NeMo and later, no spaces around the control tokens, tools).

v1 puts a system message in front of the first user turn; v3 and Tekken put it in front of the last user
turn, and list the tools (``[AVAILABLE_TOOLS]``) just before that turn, as Mistral's reference templates do.
"""


def _mistral_jinja(inst_open: str, inst_close: str, lead: str, system_last: bool, tools: bool, sp: str) -> str:
    """Build one Mistral variant. ``sp`` is the space Mistral v3 writes after ``[TOOL_CALLS]``-style tags."""
    system_turn = "ns.last_user" if system_last else "ns.first_user"
    tool_part = ""
    if tools:
        tool_part = r"""
{%- if tools and loop.index0 == ns.last_user -%}
{{- '[AVAILABLE_TOOLS]""" + sp + r"""[' -}}
{%- for tool in tools -%}{{- tool | tojson -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}{%- endfor -%}
{{- '][/AVAILABLE_TOOLS]' -}}
{%- endif -%}"""
    tool_turns = ""
    if tools:
        tool_turns = r"""
{%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}
{{- '[TOOL_CALLS]""" + sp + r"""[' -}}
{%- for call in message['tool_calls'] -%}
{%- set fn = call['function'] if call['function'] is defined else call -%}
{{- '{"name": "' + fn['name'] + '", "arguments": ' + (fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson) -}}
{%- if call['id'] is defined -%}{{- ', "id": "' + call['id'] + '"' -}}{%- endif -%}
{{- '}' -}}{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
{%- endfor -%}
{{- ']' + eos_token -}}
{%- elif message['role'] == 'tool' or message['role'] == 'tool_results' -%}
{{- '[TOOL_RESULTS]""" + sp + r"""{"content": ' + (message['content'] if message['content'] is string else message['content'] | tojson) -}}
{%- if message['tool_call_id'] is defined -%}{{- ', "call_id": "' + message['tool_call_id'] + '"' -}}{%- endif -%}
{{- '}[/TOOL_RESULTS]' -}}"""
    return (r"""
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system_text = messages[0]['content'] -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system_text = none -%}{%- set turns = messages -%}
{%- endif -%}
{%- set ns = namespace(first_user=-1, last_user=-1) -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}
{%- if ns.first_user < 0 -%}{%- set ns.first_user = loop.index0 -%}{%- endif -%}
{%- set ns.last_user = loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{%- for message in turns -%}
{%- if message['role'] == 'user' -%}""" + tool_part + r"""
{{- '""" + inst_open + r"""' -}}
{%- if system_text is not none and loop.index0 == """ + system_turn + r""" -%}{{- system_text + '\n\n' -}}{%- endif -%}
{{- message['content'] + '""" + inst_close + r"""' -}}""" + tool_turns + r"""
{%- elif message['role'] == 'assistant' -%}
{{- '""" + lead + r"""' + message['content'] | trim + eos_token -}}
{%- else -%}
{{- raise_exception('Mistral templates accept system, user, assistant' + (' and tool' if """
            + ("true" if tools else "false") + r""" else '') + ' roles, got ' + message['role']) -}}
{%- endif -%}
{%- endfor -%}
""").strip()


MISTRAL_V1 = _mistral_jinja("[INST] ", " [/INST]", "", system_last=False, tools=False, sp="")
MISTRAL_V3 = _mistral_jinja("[INST] ", "[/INST]", " ", system_last=True, tools=True, sp=" ")
MISTRAL_TEKKEN = _mistral_jinja("[INST]", "[/INST]", "", system_last=True, tools=True, sp="")


def _ollama(inst_open: str, inst_close: str, lead: str, system_last: bool) -> str:
    """The Ollama form of one variant: the system text goes into the first (v1) or last (v3, Tekken) user turn."""
    pick = """{{- if eq .Role "user" }}{{ $sysTurn = $i }}{{ end }}""" if system_last else (
        """{{- if and (eq .Role "user") (lt $sysTurn 0) }}{{ $sysTurn = $i }}{{ end }}""")
    return ("""\
{{- $sysTurn := -1 }}
{{- range $i, $_ := .Messages }}""" + pick + """{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}""" + inst_open + """{{ if and $.System (eq $i $sysTurn) }}{{ $.System }}

{{ end }}{{ .Content }}""" + inst_close + """
{{- else if eq .Role "assistant" }}""" + lead + """{{ .Content }}{{ if not $last }}</s>{{ end }}
{{- end }}
{{- end }}""")


_MISTRAL_PARTS = dict(eos_token="</s>", end_part="</s>", stop_tokens=("</s>", "[INST]"),
                      instruction_part="[INST]", response_part="[/INST]",
                      other_parts=("[AVAILABLE_TOOLS]", "[TOOL_RESULTS]"), other_response_parts=("[/TOOL_RESULTS]",))

SPECS = (
    dict(name="mistral-v1", jinja=MISTRAL_V1, ollama_template=_ollama("[INST] ", " [/INST]", "", system_last=False),
         ollama_params={"temperature": 0.7}, aliases=("mistral-v2", "mistral-7b-v0.1", "mistral-7b-v0.2"),
         source="mistralai/Mistral-7B-Instruct-v0.2 chat_template", **_MISTRAL_PARTS),
    dict(name="mistral-v3", jinja=MISTRAL_V3, ollama_template=_ollama("[INST] ", "[/INST]", " ", system_last=True),
         ollama_params={"temperature": 0.7}, tool_format="mistral", aliases=("mistral", "mistral-7b-v0.3"),
         source="mistralai/Mistral-7B-Instruct-v0.3 chat_template (v3 tokenizer format)", **_MISTRAL_PARTS),
    dict(name="mistral-tekken", jinja=MISTRAL_TEKKEN, ollama_template=_ollama("[INST]", "[/INST]", "", system_last=True),
         ollama_params={"temperature": 0.3}, tool_format="mistral",
         aliases=("mistral-nemo", "tekken", "mistral-v7-tekken"),
         source="mistralai/Mistral-Nemo-Instruct-2407 chat_template (Tekken tokenizer format)", **_MISTRAL_PARTS),
)
