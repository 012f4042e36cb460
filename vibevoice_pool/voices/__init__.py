"""The voice presets folder: the library of voices in it (library.py), who uploaded
which (owners.py), and its files on disk (folder.py)."""
