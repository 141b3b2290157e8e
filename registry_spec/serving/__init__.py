"""`zoo serve`: an OpenAI-compatible HTTP server over any model's engine. `scheduler` runs the one generation
loop's `Batch` in a thread with continuous batching, `protocol` holds the request and response schemas, `app`
the FastAPI routes, `server` the command (uvicorn, signals, warm-up)."""
