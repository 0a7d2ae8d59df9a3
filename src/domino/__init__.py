"""domino: domain-specific data synthesis via minimal sufficient representation learning."""
__version__ = "0.1.0"
