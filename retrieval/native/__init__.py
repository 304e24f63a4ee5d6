"""pixquery's own offline encoder: PyPI-shipped towers plus heads trained on Flickr8k."""
