"""pixquery's HTTP JSON API (``pixquery serve``; the optional extra ``api``: FastAPI and uvicorn).

``create_app(engine_or_config, settings)`` in ``indexer/api/app.py`` builds the FastAPI app; its endpoints
are in ``routes.py``, its bodies in ``schemas.py``, what the server's owner allows in ``settings.py``,
indexing runs in ``jobs.py`` and running it in ``server.py``. Nothing else imports this package, so the
CLI starts without FastAPI installed.
"""
