"""OpenAI-compatible routes over the engine, and vLLM's tokenizer routes, split as
vLLM splits its OpenAI server (`vllm/entrypoints/openai`):

- `textgen/openai_schemas.py`: the request bodies (vLLM's `protocol.py`);
- `serving.py`: what the routes share: parsing, a sequence's params, choices, the
  route runner (vLLM's `serving_engine.py`);
- `completions.py`, `chat.py`: `/v1/completions` and `/v1/chat/completions`;
- `server.py`: the tokenizer routes, `/health`, `/version` and `/v1/models`;
- `app.py`: the two apps the service mounts (vLLM's `api_server.py`).
"""
