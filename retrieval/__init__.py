"""Joint image-text encoders, image decoding and pure ranking code.

Knows nothing of FAISS, SQL or Streamlit (see docs/ARCHITECTURE.md).
"""
