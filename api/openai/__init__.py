"""The OpenAI-compatible surface, split as vLLM splits its OpenAI server: protocol (request schemas
and answer shapes), serving (requests into jobs, jobs into answers) and routes."""
