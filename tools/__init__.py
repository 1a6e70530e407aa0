"""The four MOSS plugins as LangChain tools (installed as ``moss_agent.tools``)."""
