"""`dit_sparse.app`: the Gradio app (`dit-sparse app`; `ui.build_app`), dense and sparse side by side.

Importing this package needs nothing beyond the base install; `dit_sparse.app.ui` needs the `app` extra (gradio).
"""
