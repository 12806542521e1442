"""One module per command that does not live in app.py; each exposes the command function app.py registers."""
