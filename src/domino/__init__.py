"""domino: domain-specific data synthesis via minimal sufficient representation learning."""
from domino.core.config import register_resolvers as _register_resolvers

__version__ = "0.1.0"
_register_resolvers()
