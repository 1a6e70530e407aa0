"""Generation engines behind one protocol (:class:`~moss_agent.engines.base.Engine`): local transformers, remote."""
