"""Graph sets: compiled step graphs as artifacts (DESIGN §4-§5).

``neuron-serve compile`` (and ``PrepService.CompileGraphs``, which runs it) compiles every graph of
one serving-shape set and publishes ``{store}/graphs/{graph_key}/graphs.json`` plus its files; an
exec server started with ``--graphs auto|required|compile`` loads it instead of compiling.

Modules: ``key`` (what the key is computed from, and the key), ``manifest`` (``graphs.json``),
``store`` (find, fetch-and-verify, publish), ``build`` (compile one set in this process),
``policy`` (the exec server's ``--graphs`` modes), ``cli`` (the ``compile`` subcommand).
"""
