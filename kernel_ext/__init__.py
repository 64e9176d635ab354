"""IPython extension (`%load_ext kernel_ext`): the notebook side of jupyterhub-inference.

It reaches the service over HTTP only and never imports `hub_extension` (a kernel needs the openai SDK,
not torch or SQLAlchemy). The extension itself is built by the notebook-side issue.
"""
