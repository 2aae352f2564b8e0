"""Request handling for the BentoML service: settings, request parsing and answers (`api`), the URL
policy (`fetch`), API keys and size caps (`guard`), the batched model pool (`pool`) and the web page.

`service.py` at the repository root is the glue that wires these into BentoML services.
"""
