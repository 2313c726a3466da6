"""The seed tutorial's service, built its way, as the benchmark's baseline.

Flask + transformers `pipeline("text-generation")` over a model directory, one
request at a time through the pipeline. The seed's exact call
(`return_tensors=True, return_text=False`) raises on transformers 5, so this
keeps its shape with `return_full_text=False`.

    python bench/seed_baseline.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys

from flask import Flask, request
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline


def create_app(model_dir: str) -> Flask:
    app = Flask(__name__)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generate_pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device=-1)

    @app.post("/text-generation/generate")
    def generate() -> dict[str, object]:
        body = request.get_json()
        out = generate_pipe(
            body["text"],
            return_full_text=False,
            do_sample=False,
            max_new_tokens=body.get("max_new_tokens", 50),
            min_new_tokens=body.get("min_new_tokens", 0),
            pad_token_id=tokenizer.eos_token_id,
        )
        return {"input": body["text"], "generated": out[0]["generated_text"]}

    @app.get("/readyz")
    def ready() -> str:
        return "ok"

    return app


if __name__ == "__main__":
    create_app(sys.argv[1]).run(host="127.0.0.1", port=int(sys.argv[2]), threaded=True)
