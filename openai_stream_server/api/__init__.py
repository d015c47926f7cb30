"""The API surfaces, one package each, all of the same shape (docs/architecture.md, "API surfaces").

Each surface (``chat``: /v1/chat/completions, ``completions``: /v1/completions, ``responses``:
/v1/responses, ``messages``: the Anthropic /v1/messages) has a ``request`` module (its pydantic
model: the request parsed into the one ``DownstreamRequest``'s parts and metadata), a ``render``
module (the one completion state, ``StreamState``, as its JSON object and its event stream) and a
``routes`` module (its ``Surface``). What they share: ``surfaces`` (what each surface is: name, paths,
ids, error shape), ``surface`` (the routes' base: ids, error answers, by-id lookups), ``follow`` (the
loop every event stream runs), ``dispatch`` (opening a completion and sending it downstream),
``common`` (body, client-gone watch, resume points, image cap) and ``tools`` (function tools).
"""
