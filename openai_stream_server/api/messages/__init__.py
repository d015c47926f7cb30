"""/v1/messages (Anthropic): ``request`` (the models), ``render`` (the message and its events), ``routes``."""
