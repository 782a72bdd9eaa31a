"""`dynaformer serve`: an OpenAI-compatible completions server with continuous batching (docs/design.md §11).

`config.py` holds the typed options (the command line is generated from them), `engine.py` the scheduler
(admission by KV budget, iteration-level batching; no HTTP), `app.py` the Starlette app and `server.py` the
uvicorn process (listening socket, SIGTERM drain). Only `config.py` is imported by the command line's parser;
the rest, and uvicorn and Starlette (the [serve] extra), load when the server starts."""
