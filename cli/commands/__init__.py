"""One module per command beyond the core ones in app.py: extract and resize expose the command function app.py
registers; compare and trajectory expose `register(app)`."""
