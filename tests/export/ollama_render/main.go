// Command ollama_render executes Ollama Modelfile TEMPLATEs the way Ollama's server does, so tests can
// compare the prompt Ollama would build with the one the training chat template renders.
//
// It reads a JSON list of cases from stdin, each {"template", "system", "messages", "tools"}, and writes a
// JSON list of {"text"} or {"error"} in the same order. What it reproduces of Ollama:
//   - Go text/template with missingkey=zero and Ollama's extra functions (json, currentDate, yesterdayDate,
//     toTypeScriptType);
//   - a template that names neither .Messages nor .Response gets {{ .Response }} appended;
//   - the Modelfile SYSTEM is prepended as a system message when the conversation has none;
//   - consecutive messages of one role (tool results excepted) are merged with a blank line, and .System
//     holds every system message joined by a blank line (system messages stay in .Messages too);
//   - templates that use .Messages are run once; older .System/.Prompt/.Response templates once per turn,
//     the last run cut after {{ .Response }} so the prompt ends where the model continues.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// jsonText prints as compact JSON inside a template, like Ollama's tool arguments and tool definitions.
type jsonText map[string]any

func (m jsonText) String() string { b, _ := json.Marshal(map[string]any(m)); return string(b) }

type toolFunction struct {
	Name        string   `json:"name"`
	Description string   `json:"description"`
	Parameters  jsonText `json:"parameters"`
}

func (f toolFunction) String() string { b, _ := json.Marshal(f); return string(b) }

type tool struct {
	Type     string       `json:"type"`
	Function toolFunction `json:"function"`
}

func (t tool) String() string { b, _ := json.Marshal(t); return string(b) }

type toolCall struct {
	ID       string `json:"id"`
	Function struct {
		Index     int      `json:"index"`
		Name      string   `json:"name"`
		Arguments jsonText `json:"arguments"`
	} `json:"function"`
}

type message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking"`
	ToolCalls  []toolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

type renderCase struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []message `json:"messages"`
	Tools    []tool    `json:"tools"`
}

type result struct {
	Text  *string `json:"text,omitempty"`
	Error string  `json:"error,omitempty"`
}

var funcs = template.FuncMap{
	"json":             func(v any) string { b, _ := json.Marshal(v); return string(b) },
	"currentDate":      func(...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate":    func(...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(any) string { return "any" },
}

// names collects the lower-cased field and variable names a template refers to.
func names(n parse.Node, seen map[string]bool) {
	switch n := n.(type) {
	case *parse.ListNode:
		if n != nil {
			for _, c := range n.Nodes {
				names(c, seen)
			}
		}
	case *parse.ActionNode:
		names(n.Pipe, seen)
	case *parse.TemplateNode:
		names(n.Pipe, seen)
	case *parse.IfNode:
		names(&n.BranchNode, seen)
	case *parse.RangeNode:
		names(&n.BranchNode, seen)
	case *parse.WithNode:
		names(&n.BranchNode, seen)
	case *parse.BranchNode:
		names(n.Pipe, seen)
		names(n.List, seen)
		names(n.ElseList, seen)
	case *parse.PipeNode:
		if n != nil {
			for _, c := range n.Cmds {
				for _, a := range c.Args {
					names(a, seen)
				}
			}
		}
	case *parse.FieldNode:
		for _, id := range n.Ident {
			seen[strings.ToLower(id)] = true
		}
	case *parse.VariableNode:
		for _, id := range n.Ident {
			seen[strings.ToLower(id)] = true
		}
	}
}

// cutAfterResponse drops every node that follows the first {{ .Response }}, recursing into blocks.
func cutAfterResponse(n parse.Node, cut *bool) {
	switch n := n.(type) {
	case *parse.ListNode:
		kept := []parse.Node{}
		for _, c := range n.Nodes {
			if !*cut {
				cutAfterResponse(c, cut)
				kept = append(kept, c)
			}
		}
		n.Nodes = kept
	case *parse.IfNode:
		cutBranch(&n.BranchNode, cut)
	case *parse.RangeNode:
		cutBranch(&n.BranchNode, cut)
	case *parse.WithNode:
		cutBranch(&n.BranchNode, cut)
	case *parse.ActionNode:
		seen := map[string]bool{}
		names(n.Pipe, seen)
		*cut = seen["response"]
	}
}

func cutBranch(b *parse.BranchNode, cut *bool) {
	cutAfterResponse(b.List, cut)
	if b.ElseList != nil {
		cutAfterResponse(b.ElseList, cut)
	}
}

func render(c renderCase) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	vars := map[string]bool{}
	for _, t := range tmpl.Templates() {
		names(t.Root, vars)
	}
	if !vars["messages"] && !vars["response"] {
		tmpl.Root.Nodes = append(tmpl.Root.Nodes, &parse.ActionNode{NodeType: parse.NodeAction,
			Pipe: &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{{NodeType: parse.NodeCommand,
				Args: []parse.Node{&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}}}}}})
	}
	msgs := c.Messages
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]message{{Role: "system", Content: c.System}}, msgs...)
	}
	var systems []string
	var merged []*message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if len(merged) > 0 && merged[len(merged)-1].Role == m.Role && m.Role != "tool" {
			merged[len(merged)-1].Content += "\n\n" + m.Content
		} else {
			merged = append(merged, &m)
		}
	}
	var out bytes.Buffer
	if vars["messages"] {
		err = tmpl.Execute(&out, map[string]any{"System": strings.Join(systems, "\n\n"), "Messages": merged,
			"Tools": c.Tools, "Response": "", "Think": false, "ThinkLevel": "", "IsThinkSet": false})
		return out.String(), err
	}
	turn := map[string]any{"System": "", "Prompt": "", "Response": ""}
	flush := func() error {
		err := tmpl.Execute(&out, turn)
		turn = map[string]any{"System": "", "Prompt": "", "Response": ""}
		return err
	}
	for _, m := range merged {
		switch {
		case m.Role == "system" && (turn["Prompt"] != "" || turn["Response"] != ""),
			m.Role == "user" && turn["Response"] != "":
			if err := flush(); err != nil {
				return "", err
			}
		}
		switch m.Role {
		case "system":
			turn["System"] = m.Content
		case "user":
			turn["Prompt"] = m.Content
		case "assistant":
			turn["Response"] = m.Content
		}
	}
	last := tmpl.Root.CopyList()
	cut := false
	cutAfterResponse(last, &cut)
	tail, err := template.New("").Option("missingkey=zero").Funcs(funcs).AddParseTree("", &parse.Tree{Root: last})
	if err == nil {
		err = tail.Execute(&out, turn)
	}
	return out.String(), err
}

func main() {
	var cases []renderCase
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		os.Stderr.WriteString("ollama_render: stdin is not a JSON list of cases: " + err.Error() + "\n")
		os.Exit(2)
	}
	results := make([]result, len(cases))
	for i, c := range cases {
		text, err := render(c)
		if err != nil {
			results[i].Error = err.Error()
		} else {
			results[i].Text = &text
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(results); err != nil {
		os.Exit(1)
	}
}
