"""The offline demo of spectra: fine-tune all-MiniLM-L6-v2 two ways on stdlib code search, analyse both."""
