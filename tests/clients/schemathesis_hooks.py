"""schemathesis hooks for kojo: generated requests ask for thousands of tokens and dozens of
choices; cap them so a run finishes on a CPU, and point most requests at the served model
($KOJO_MODEL_ID) so they get past the model check."""
import os

import schemathesis


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        if isinstance(body.get("model"), str) and hash(body["model"]) % 4 != 0:
            body["model"] = os.environ.get("KOJO_MODEL_ID", body["model"])
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(k), int) and body[k] > 8:
                body[k] = 8
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 8  # without a limit, chat may use the whole context
        if isinstance(body.get("n"), int) and body["n"] > 1:
            body["n"] = 1
    return body
