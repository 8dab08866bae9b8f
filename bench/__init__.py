"""Handoff's benchmark: engine alone, against the vendor emulators, and incremental no-op runs.

Run it with `python -m bench.run [--quick|--full]`; see bench/README.md. Importing this package
does nothing.
"""
