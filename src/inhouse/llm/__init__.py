"""LLM serving: the generation engine and the contract the OpenAI / Anthropic adapters use."""
