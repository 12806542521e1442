"""One module per command (beyond the core ones in app.py); each exposes `register(app)`."""
