"""The OpenAI-compatible HTTP API (aiohttp): request/response structs, routes, SSE streaming, errors.

``pied.api.app.create_app(state)`` builds the aiohttp application; ``pied serve`` runs it.
"""
