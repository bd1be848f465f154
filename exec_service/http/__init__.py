"""The OpenAI-compatible HTTP front of the exec server (``exec-server --http-port P``).

A second front on the same engine, beside gRPC, in the same process and on the same event loop (no
proxy hop): ``schema`` (pydantic models of the OpenAI request bodies: types only), ``mapping`` (a
body → ``requests.GenerateParams``, the one internal request both fronts build, validated by
``requests.parse_request``; ``GenerateResponse`` messages → OpenAI objects and chunks), ``errors``
(the one status → HTTP status / OpenAI error map), ``app`` (the routes, bearer auth, SSE with
cancel-on-disconnect) and ``server`` (uvicorn on the running loop, TLS from the gRPC settings).
"""
