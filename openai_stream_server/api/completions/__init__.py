"""/v1/completions: ``request`` (the model), ``render`` (the object and its chunks), ``routes``."""
