"""File discovery, the indexing pipeline, metadata store, FAISS vectors, the Engine and the CLI."""
