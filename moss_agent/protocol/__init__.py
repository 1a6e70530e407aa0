"""MOSS's text protocol: the plugin table, prompt rendering and parsing. Pure string work (no torch, no LangChain)."""
