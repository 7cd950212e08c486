"""The embedded demo: a tiny MMDiT editor for the shapes world (`data.shapes`) that runs on a laptop CPU."""
