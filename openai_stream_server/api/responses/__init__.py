"""/v1/responses: ``request``, ``echo``, ``items``, ``walk`` (items and event numbers), ``render``, ``routes``."""
