from spectra_cli.app import main

main()
