"""ipywidgets panels (AccountPanel, AdminPanel) that talk to the service over HTTP.

Like `kernel_ext`, this package never imports `hub_extension`. The panels are built by their own issue.
"""
