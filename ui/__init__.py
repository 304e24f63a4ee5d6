"""The Streamlit app (``pixquery ui``): Search and Collection pages over the Engine API.

``app.py`` is the entry point (``streamlit run ui/app.py``); ``resources`` holds the Engine and the
background indexing jobs; ``security`` and ``thumbnails`` hold what is served and how.
Nothing imports this package: ``pixquery ui`` runs the app by path.
"""
