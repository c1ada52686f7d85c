"""Using the embeddings: exports (sentence-transformers, vLLM), a faiss index and search, an HTTP server."""
