"""A user's presets and knowledge collections (`/api/presets`, `/api/collections`), and everyone's for admins.

Gated by the `resources` feature. A name is looked up among the caller's own resources only, so another user's
preset or collection answers 404, exactly like one that does not exist. While an admin views as a user, the
request is that user's. Admins list everyone's (`/api/admin/resources`) and delete a user's (audited) under
`/api/users/{name}/presets` and `/api/users/{name}/collections`. The work is in `presets.PresetStore` and
`knowledge.KnowledgeBase`; handlers parse, resolve the owner and write JSON.
"""

from __future__ import annotations

from ..errors import BadRequest, Forbidden, NotFound
from .account import MAX_ROW_ID
from .admin import AdminHandler
from .base import APIHandler


class ResourcesHandler(APIHandler):
    """The caller's own resources."""

    @property
    def presets(self):
        return self.services.presets

    @property
    def knowledge(self):
        return self.services.knowledge

    def reader(self) -> int:
        """The caller's user id for reading (0: a user with no row yet, who has nothing)."""
        if not self.services.permissions.allowed(self.identity, "resources"):
            raise Forbidden("You may not use presets and collections (feature 'resources').")
        if self.identity.user_id is None:
            raise BadRequest("Presets and collections belong to users; this service runs without user identities.")
        return self.identity.user_id

    async def writer(self) -> int:
        """The caller's user id for a change: a Hub user viewed-as before their first visit gets their row now."""
        user_id = self.reader()
        if not user_id:
            user_id = (await self.services.admin.state(self.identity.name)).id
        return user_id

    def check_model(self, model: str) -> None:
        """A preset names a chat model the caller may use now (checked again whenever it is used)."""
        manager = self.services.models
        spec = manager.spec(model) if manager is not None else None
        if spec is None or spec.task != "chat" or not self.services.permissions.allowed(self.identity, "chat", model):
            raise BadRequest(f"The model '{model}' is not a chat model you may use.", param="model",
                             code="model_not_found")

    def no_content(self) -> None:
        self.set_status(204)
        self.finish()


class PresetsHandler(ResourcesHandler):
    async def get(self) -> None:
        self.write_json({"presets": await self.presets.list(self.reader())})

    async def post(self) -> None:
        self.reader()
        fields = self.presets.parse(await self.json_body())
        self.check_model(fields["model"])
        self.write_json(await self.presets.create(await self.writer(), fields), status=201)



class PresetHandler(ResourcesHandler):
    async def get(self, name: str) -> None:
        self.write_json(await self.presets.get(self.reader(), name))

    async def _change(self, name: str, partial: bool) -> None:
        user_id = self.reader()
        fields = self.presets.parse(await self.json_body(), partial=partial)
        if "model" in fields:
            self.check_model(fields["model"])
        self.write_json(await self.presets.update(user_id, name, fields))

    async def put(self, name: str) -> None:
        await self._change(name, partial=False)

    async def patch(self, name: str) -> None:
        await self._change(name, partial=True)

    async def delete(self, name: str) -> None:
        await self.presets.delete(self.reader(), name)
        self.no_content()


class CollectionsHandler(ResourcesHandler):
    async def get(self) -> None:
        self.write_json({"collections": await self.knowledge.list(self.reader())})

    async def post(self) -> None:
        self.reader()
        fields = self.knowledge.parse_collection(await self.json_body())
        self.write_json(await self.knowledge.create(await self.writer(), fields), status=201)


class CollectionHandler(ResourcesHandler):
    async def get(self, name: str) -> None:
        self.write_json(await self.knowledge.get(self.reader(), name))

    async def delete(self, name: str) -> None:
        await self.knowledge.delete(self.reader(), name)
        self.no_content()


class DocumentsHandler(ResourcesHandler):
    async def get(self, name: str) -> None:
        self.write_json({"documents": await self.knowledge.documents(self.reader(), name)})

    async def post(self, name: str) -> None:
        user_id = self.reader()
        docs = self.knowledge.parse_documents(await self.json_body())
        self.write_json(await self.knowledge.add_documents(user_id, name, docs, self.identity), status=201)


class DocumentHandler(ResourcesHandler):
    async def delete(self, name: str, document_id: str) -> None:
        digits = document_id.isascii() and document_id.isdigit() and len(document_id) <= 10
        if not digits or int(document_id) > MAX_ROW_ID:  # past the id column PostgreSQL would fail: none such
            raise NotFound("No such document in this collection.")
        await self.knowledge.delete_document(self.reader(), name, int(document_id))
        self.no_content()


class SearchHandler(ResourcesHandler):
    async def post(self, name: str) -> None:
        user_id = self.reader()
        query, top_k = self.knowledge.parse_search(await self.json_body())
        self.write_json(await self.knowledge.search(user_id, name, query, top_k, self.identity))


# -- admins ------------------------------------------------------------------------------------------------


class AdminResourcesHandler(AdminHandler):
    """`GET /api/admin/resources`: everyone's presets and collections, with their owners."""

    async def get(self) -> None:
        self.write_json({"presets": await self.services.presets.list_all(),
                         "collections": await self.services.knowledge.list_all()})


class UserPresetsHandler(AdminHandler):
    """`/api/users/{name}/presets[/{preset}]`: a user's presets; `DELETE` removes one or all (audited)."""

    async def get(self, name: str, item: str | None = None) -> None:
        state = await self.admin.lookup(name)
        store = self.services.presets
        self.write_json(await store.get(state.id, item) if item else {"presets": await store.list(state.id)})

    async def delete(self, name: str, item: str | None = None) -> None:
        state = await self.admin.lookup(name)
        deleted = await self.services.presets.delete(state.id, item, audit=self.audit_context(name))
        self.write_json({"deleted": deleted})


class UserCollectionsHandler(AdminHandler):
    """`/api/users/{name}/collections[/{collection}]`: a user's collections; `DELETE` removes one or all
    (audited)."""

    async def get(self, name: str, item: str | None = None) -> None:
        state = await self.admin.lookup(name)
        kb = self.services.knowledge
        self.write_json(await kb.get(state.id, item) if item else {"collections": await kb.list(state.id)})

    async def delete(self, name: str, item: str | None = None) -> None:
        state = await self.admin.lookup(name)
        deleted = await self.services.knowledge.delete(state.id, item, audit=self.audit_context(name))
        self.write_json({"deleted": deleted})


routes = [
    (r"/api/presets", PresetsHandler),
    (r"/api/presets/([^/]+)", PresetHandler),
    (r"/api/collections", CollectionsHandler),
    (r"/api/collections/([^/]+)", CollectionHandler),
    (r"/api/collections/([^/]+)/documents", DocumentsHandler),
    (r"/api/collections/([^/]+)/documents/([^/]+)", DocumentHandler),
    (r"/api/collections/([^/]+)/search", SearchHandler),
    (r"/api/admin/resources", AdminResourcesHandler),
    (r"/api/users/([^/]+)/presets", UserPresetsHandler),
    (r"/api/users/([^/]+)/presets/([^/]+)", UserPresetsHandler),
    (r"/api/users/([^/]+)/collections", UserCollectionsHandler),
    (r"/api/users/([^/]+)/collections/([^/]+)", UserCollectionsHandler),
]
