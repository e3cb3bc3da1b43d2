"""Files in and out: data sets, pictures, and model export/load."""
