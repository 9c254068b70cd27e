"""`dpllama serve`: an OpenAI-compatible HTTP server (app.py) over an engine that runs several requests in the
model's slots (engine.py), with its request bodies (schemas.py), Prometheus metrics (metrics.py) and Ray Serve
replicas (ray_serve.py). FastAPI, uvicorn, prometheus_client and ray are imported here only, so that no other
command loads them."""
