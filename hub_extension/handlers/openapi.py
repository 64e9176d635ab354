"""`GET /openapi.json`: the API description (public: it holds no secret, only what every client may call)."""

from __future__ import annotations

from .base import APIHandler, Auth


class OpenAPIHandler(APIHandler):
    """The document built at start for this instance's routes and prefix (`openapi.document`)."""

    auth = Auth.PUBLIC

    def get(self) -> None:
        self.write_json(self.settings["openapi_document"])


routes = [(r"/openapi.json", OpenAPIHandler)]
