"""The runnable LLM experiments: each a small ``main()`` over the ``llm`` library, ``probes`` and ``plumbing``,
never importing another experiment."""
