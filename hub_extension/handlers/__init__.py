"""HTTP handlers: thin layers that parse a request, call a component and write JSON."""
