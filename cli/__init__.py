"""The spectra command line (installed as spectra_cli)."""
