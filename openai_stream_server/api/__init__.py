"""The API surfaces, one module each (docs/architecture.md, "Architecture", the HTTP layer).

Each surface (``chat``: /v1/chat/completions, ``responses``: /v1/responses, ``completions``:
/v1/completions, ``messages``: the Anthropic /v1/messages) parses its own request into the one
``DownstreamRequest`` the nodes understand and renders the one completion state (``StreamState``:
its log of pieces, status and usage) into its own JSON and SSE shapes. What they share is in
``common`` (body reading, error responses, the client-gone watch) and ``dispatch`` (opening a
completion and sending it downstream). The stream state, the registry and the dora bridge do not
know which surface a completion came from, beyond a label for metrics and the log line.
"""
