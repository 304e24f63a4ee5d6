"""The Streamlit app (``pixquery ui``): arrives with the app issue; it will use only the Engine API."""
