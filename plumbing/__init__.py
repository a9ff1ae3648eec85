"""Plumbing shared by ``toy/`` and ``llm/``: Hugging Face / TRL / peft glue and run-folder bookkeeping.

Nothing here knows about processes, beliefs or EM data; ``toy`` and ``llm`` both import it, it imports
neither.
"""
