"""State that outlives the process: one completion as a plain record, and where records are kept.

``record`` is the record and its compact encoding; ``base`` the ``Store`` seam every back end
implements; ``memory_store``, ``sqlite_store`` and ``redis_store`` the three back ends; ``config``
reads the ``--store`` option and opens the one it names (docs/store.md).
"""
