"""The pipeline's steps (bake, search, train, validate, export, verify, inspect), each a thin layer over
``convert.formats``, ``convert.runtimes`` and ``convert.evaluate``.  A stage never imports another stage."""
