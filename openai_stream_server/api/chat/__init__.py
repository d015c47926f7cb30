"""/v1/chat/completions: ``request`` (the model), ``render`` (the object and the chunk stream), ``routes``."""
