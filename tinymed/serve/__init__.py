"""Serve stage: `create_app(lm, ServeConfig)` (FastAPI: web page + OpenAI-compatible API), `serve(...)`
(uvicorn), `BackgroundServer` (a real server on a thread, for tests and benchmarks). Submodules:
`images` (PNG/JPEG/DICOM decoding + limits), `batching` (queue + worker), `engine` (batched streamed
generation), `protocol` (OpenAI wire format), `calls` (one request in flight: events, disconnect,
deadline, audit), `middleware` (headers, body limit, loopback guard, memory release), `memory`,
`security`, `audit`. Import them directly: importing `tinymed.serve` alone pulls in no web framework."""
