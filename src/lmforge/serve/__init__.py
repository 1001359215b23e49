"""An OpenAI-compatible HTTP server on `LLMEngine`, and a client for such servers (ours or vLLM).

    server.py         `lmforge serve MODEL`: uvicorn, loading in the background, the SIGTERM drain
    app.py            the routes: decode the request, call the driver, encode the answer (JSON or SSE)
    schemas.py        request / response bodies in OpenAI's shapes (pydantic; /openapi.json)
    params.py         request -> prompt ids, SamplingParams, stop strings; the checks that need the model
    chat_template.py  messages -> the model's chat format -> ids (ours, or the folder's Jinja template)
    generation.py     engine outputs -> the choices' text (detokenization, stop strings, finish reasons)
    tokens.py         token strings and bytes, OpenAI's log-probability shapes
    driver.py         one thread owns the engine and steps it; the event loop only enqueues and awaits
    errors.py         errors in OpenAI's shape (400 with `param`, never FastAPI's 422)
    metrics.py        Prometheus metrics
    client.py         `EndpointAnswerer` (the official openai client) and `EngineAnswerer` (in-process)
"""
