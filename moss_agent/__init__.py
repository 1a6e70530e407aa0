"""moss-agent: the MOSS chat models (moss-moon-003) as first-class LangChain citizens."""

__version__ = "0.1.0"
