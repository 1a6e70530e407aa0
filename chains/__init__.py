"""Ready-made LangChain chains over MOSS (installed as ``moss_agent.chains``)."""
