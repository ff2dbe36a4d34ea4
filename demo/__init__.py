"""The demo page (Gradio) over clip_utils: `python app.py` at the repository root serves it."""
