"""The Gradio page: layout, live audio, the status panel, charts, the jobs tab
and the page's words in each language."""
