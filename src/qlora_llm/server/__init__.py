"""The REST server: `create_app` (app.py), its routes (routes.py), schemas (schemas.py), the batching engine."""
