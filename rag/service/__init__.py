"""The RAG service, the torch side: models, corpus and index, the pipeline, and the HTTP
app with its batcher and metrics.  Importing this package imports no torch: the server
opens its port first and loads models on its compute thread."""
