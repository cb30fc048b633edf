"""Chat-template registry and the built-in templates, one module per model family."""

# Stands for the tokenizer's EOS text in Ollama templates of formats that end turns with the tokenizer's
# own EOS (Ollama's template data has no such variable); the export layer substitutes it.
OLLAMA_EOS = "<[EOS_TOKEN]>"

# A tool call's arguments as the training templates' ``tojson`` writes a flat object (", " and ": "
# separators); Go ranges over the map in sorted key order, so key order matches when the data's is sorted.
OLLAMA_JSON_ARGS = ('{{ "{" }}{{ $first := true }}{{ range $k, $v := .Function.Arguments }}'
                    '{{ if not $first }}, {{ end }}{{ $first = false }}{{ json $k }}: {{ json $v }}{{ end }}{{ "}" }}')
