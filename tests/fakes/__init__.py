"""Test doubles: local fake service-LLM servers (see llm_servers)."""
