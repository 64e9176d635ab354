"""ipywidgets panels (AccountPanel, AdminPanel) that talk to the service over HTTP.

Like `kernel_ext`, this package never imports `hub_extension`: its data comes only through
`kernel_ext.service_api.InferenceClient`, and its look only from `widgets.style`.
"""

from .account import AccountPanel
from .admin import AdminPanel

__all__ = ["AccountPanel", "AdminPanel"]
