"""Presets and knowledge collections through the Hub's proxy, on both instances: a user's own work (a preset used
from the openai SDK, a collection searched with the real MiniLM), the isolation matrix (another user can neither
read, change, search nor use them in chat: 404), bad input, the `resources` feature gate, admins listing and
deleting everyone's (audited), and embedding tokens counted as usage."""

from __future__ import annotations

from urllib.parse import quote, urlparse

import openai
import pytest
import requests
from browser import screenshot
from conftest import bearer, wait_for
from playwright.sync_api import expect
from test_knowledge import DOCUMENTS, QUERIES

PRESET = {"name": "brief", "model": "tiny-chat", "system_prompt": "Answer in one word.",
          "parameters": {"max_tokens": 3, "temperature": 0}}


def call(instance, headers: dict, method: str, path: str, body=None, status: int = 200):
    r = requests.request(method, instance.url + path, headers=headers, json=body, timeout=120)
    assert r.status_code == status, (method, path, r.status_code, r.text)
    if status >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        return error
    return r.json() if r.content else None


def user(hub, prefix: str = "res") -> tuple[str, dict, str]:
    name = hub.new_user(prefix)
    token = hub.api.user_token(name)
    return name, bearer(token), token


def fill(instance, headers: dict, name: str = "notes") -> dict:
    call(instance, headers, "POST", "api/collections", {"name": name, "description": "facts"}, 201)
    docs = [{"title": title, "text": text} for title, text in DOCUMENTS.items()]
    return call(instance, headers, "POST", f"api/collections/{name}/documents", {"documents": docs}, 201)


def test_a_users_presets_and_collections_are_theirs_alone(hub, instance):
    ann, ann_h, ann_token = user(hub)
    bob, bob_h, bob_token = user(hub)
    # Ann's preset, used from the openai SDK: its model, system prompt and parameters apply.
    made = call(instance, ann_h, "POST", "api/presets", PRESET, 201)
    assert made["name"] == "brief" and made["parameters"] == PRESET["parameters"]
    client = openai.OpenAI(base_url=instance.url + "v1", api_key=ann_token, max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="preset:brief", messages=[{"role": "user", "content": "hi"}])
    assert answer.model == "tiny-chat" and answer.usage.completion_tokens <= 3
    assert answer.usage.prompt_tokens > len("Answer in one word.") // 8  # the system prompt was sent
    longer = client.chat.completions.create(model="preset:brief", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5)
    assert longer.usage.completion_tokens <= 5
    client.close()
    # Ann's collection: the relevant document first for every query.
    added = fill(instance, ann_h)
    assert added["chunks"] == len(DOCUMENTS) and added["usage"]["prompt_tokens"] > 0
    for query, expected in QUERIES.items():
        found = call(instance, ann_h, "POST", "api/collections/notes/search", {"query": query, "top_k": 2})
        assert found["results"][0]["document"]["title"] == expected, (query, found["results"])
    # Bob sees none of it, whatever he tries: 404, as for names nobody has.
    assert call(instance, bob_h, "GET", "api/presets") == {"presets": []}
    assert call(instance, bob_h, "GET", "api/collections") == {"collections": []}
    for method, path, body in [
        ("GET", "api/presets/brief", None),
        ("PATCH", "api/presets/brief", {"system_prompt": "mine"}),
        ("PUT", "api/presets/brief", PRESET),
        ("DELETE", "api/presets/brief", None),
        ("GET", "api/collections/notes", None),
        ("GET", "api/collections/notes/documents", None),
        ("POST", "api/collections/notes/documents", {"documents": ["mine now"]}),
        ("POST", "api/collections/notes/search", {"query": "tides"}),
        ("DELETE", "api/collections/notes/documents/1", None),
        ("DELETE", "api/collections/notes", None),
    ]:
        call(instance, bob_h, method, path, body, 404)
    bob_client = openai.OpenAI(base_url=instance.url + "v1", api_key=bob_token, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as info:
        bob_client.chat.completions.create(model="preset:brief", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    bob_client.close()
    # Still Ann's, unchanged; and she can delete them.
    assert call(instance, ann_h, "GET", "api/presets/brief")["system_prompt"] == PRESET["system_prompt"]
    assert call(instance, ann_h, "GET", "api/collections/notes")["documents"] == len(DOCUMENTS)
    docs = call(instance, ann_h, "GET", "api/collections/notes/documents")["documents"]
    call(instance, ann_h, "DELETE", f"api/collections/notes/documents/{docs[0]['id']}", status=204)
    assert call(instance, ann_h, "GET", "api/collections/notes")["documents"] == len(DOCUMENTS) - 1
    call(instance, ann_h, "DELETE", "api/presets/brief", status=204)
    call(instance, ann_h, "DELETE", "api/collections/notes", status=204)
    assert call(instance, ann_h, "GET", "api/collections") == {"collections": []}


def test_bad_input_is_a_clear_400(hub, instance):
    _, h, token = user(hub)
    call(instance, h, "POST", "api/collections", {"name": "c"}, 201)
    docs = "api/collections/c/documents"
    for body in ({"documents": []}, {"documents": [""]}, {"documents": ["x" * 200_001]}, {"documents": "x"},
                 {"documents": ["x"] * 101}):
        assert call(instance, h, "POST", docs, body, 400)["param"] == "documents"
    for top_k in (0, 51, "3"):
        error = call(instance, h, "POST", "api/collections/c/search", {"query": "q", "top_k": top_k}, 400)
        assert error["param"] == "top_k"
    call(instance, h, "POST", "api/collections/nothing/search", {"query": "q"}, 404)
    call(instance, h, "POST", "api/collections/nothing/documents", {"documents": ["x"]}, 404)
    call(instance, h, "POST", "api/collections", {"name": "c"}, 409)
    call(instance, h, "POST", "api/collections", {"name": "../etc"}, 400)
    assert call(instance, h, "POST", "api/presets", {**PRESET, "model": "minilm"}, 400)["param"] == "model"
    assert call(instance, h, "POST", "api/presets", {**PRESET, "model": "nope"}, 400)["param"] == "model"
    assert call(instance, h, "POST", "api/presets", {**PRESET, "parameters": {"top_p": 7}}, 400)["param"] == "top_p"
    client = openai.OpenAI(base_url=instance.url + "v1", api_key=token, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="preset:none", messages=[{"role": "user", "content": "hi"}])
    client.close()


def test_the_resources_feature_gates_everything(hub, instance):
    name, h, token = user(hub)
    admin = bearer(hub.api.user_token(hub.new_admin()))
    call(instance, h, "POST", "api/presets", PRESET, 201)
    call(instance, admin, "PATCH", f"api/users/{name}/grants", {"features": {"resources": False}})
    for method, path, body in [("GET", "api/presets", None), ("POST", "api/presets", PRESET),
                               ("GET", "api/presets/brief", None), ("GET", "api/collections", None),
                               ("POST", "api/collections", {"name": "c"}),
                               ("POST", "api/collections/c/search", {"query": "q"})]:
        assert call(instance, h, method, path, body, 403)["code"] == "permission_denied"
    client = openai.OpenAI(base_url=instance.url + "v1", api_key=token, max_retries=0, timeout=60)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="preset:brief", messages=[{"role": "user", "content": "hi"}])
    # A preset's model must still be allowed: taking the model away takes the preset with it.
    call(instance, admin, "PUT", f"api/users/{name}/grants", {"models": {"tiny-chat": False}})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="preset:brief", messages=[{"role": "user", "content": "hi"}])
    client.close()


def test_admins_list_and_delete_everyones_audited(hub, instance):
    ann, ann_h, _ = user(hub)
    admin_name = hub.new_admin()
    admin = bearer(hub.api.user_token(admin_name))
    call(instance, ann_h, "POST", "api/presets", PRESET, 201)
    call(instance, ann_h, "POST", "api/collections", {"name": "notes"}, 201)
    everyone = call(instance, admin, "GET", "api/admin/resources")
    assert {"user": ann, "name": "brief"}.items() <= next(p for p in everyone["presets"] if p["user"] == ann).items()
    assert any(c["user"] == ann and c["name"] == "notes" for c in everyone["collections"])
    assert [p["name"] for p in call(instance, admin, "GET", f"api/users/{ann}/presets")["presets"]] == ["brief"]
    assert call(instance, admin, "GET", f"api/users/{ann}/collections/notes")["name"] == "notes"
    call(instance, ann_h, "GET", "api/admin/resources", status=403)
    call(instance, ann_h, "DELETE", f"api/users/{ann}/presets", status=403)
    assert call(instance, admin, "DELETE", f"api/users/{ann}/presets/brief") == {"deleted": 1}
    assert call(instance, admin, "DELETE", f"api/users/{ann}/collections") == {"deleted": 1}
    call(instance, admin, "DELETE", f"api/users/{ann}/collections/notes", status=404)
    assert call(instance, ann_h, "GET", "api/presets") == {"presets": []}
    assert call(instance, ann_h, "GET", "api/collections") == {"collections": []}
    events = call(instance, admin, "GET", f"api/audit?user={ann}")["events"]
    deleted = {e["action"]: e for e in events if e["action"].endswith(".deleted")}
    assert set(deleted) == {"presets.deleted", "collections.deleted"}
    assert all(e["actor"] == admin_name and e["subject"] == ann for e in deleted.values())
    assert deleted["presets.deleted"]["details"] == {"names": ["brief"], "count": 1}


def test_embedding_tokens_are_usage(hub, instance):
    _, h, _ = user(hub)
    added = fill(instance, h)
    found = call(instance, h, "POST", "api/collections/notes/search", {"query": "tides", "top_k": 1})
    tokens = added["usage"]["prompt_tokens"] + found["usage"]["prompt_tokens"]

    def reported():
        r = call(instance, h, "GET", "api/usage?group_by=endpoint")
        return r if r["totals"]["prompt_tokens"] == tokens else None

    report = wait_for(reported, timeout=30, interval=0.3, what="the collection's tokens in /api/usage")
    assert report["totals"]["requests"] == 2 and report["totals"]["completion_tokens"] == 0
    used = call(instance, h, "GET", "api/me/quota")["limits"]["tokens_per_day"]["used"]
    assert used >= tokens


def test_panels_show_create_search_and_delete(hub, instance):
    """The AccountPanel's presets and collections, driven as clicks drive them; the AdminPanel's everyone's."""
    from kernel_ext.service_api import InferenceClient
    from widgets import AccountPanel, AdminPanel

    name, h, token = user(hub, "respanel")
    panel = AccountPanel(InferenceClient(instance.url, token))
    assert panel.error.value == "" and panel.resources_section.layout.display is None
    assert "tiny-chat" in panel.preset_model.options and "minilm" not in panel.preset_model.options
    panel.create_preset()  # no name: refused in the panel
    assert "name" in panel.error.value and call(instance, h, "GET", "api/presets") == {"presets": []}
    panel.preset_name.value, panel.preset_model.value, panel.preset_prompt.value = "brief", "tiny-chat", "Be brief."
    panel.create_preset()
    assert panel.error.value == "" and "preset:brief" in panel.preset_rows.children[0].children[0].value
    assert "default parameters" in panel.preset_rows.children[0].children[0].value
    stored = call(instance, h, "GET", "api/presets/brief")
    assert stored["system_prompt"] == "Be brief." and stored["parameters"] == {}  # empty fields: none set
    panel.collection_name.value = "notes"
    panel.create_collection()
    assert panel.collection_pick.value == "notes"
    for title, text in list(DOCUMENTS.items())[:3]:
        panel.document_title.value, panel.document_text.value = title, text
        panel.add_document()
    assert panel.error.value == "" and call(instance, h, "GET", "api/collections/notes")["documents"] == 3
    panel.search_query.value = "What happens when magma erupts from a mountain?"
    panel.search()
    assert panel.error.value == "" and "volcanoes" in panel.search_results.value
    assert panel.search_results.value.index("volcanoes") < panel.search_results.value.index("sourdough")

    admin = AdminPanel(InferenceClient(instance.url, hub.api.user_token(hub.new_admin())))
    assert name in admin.resources_view.value and "brief" in admin.resources_view.value
    assert "default parameters" in admin.resources_view.value
    admin.resource_user.value, admin.resource_kind.value = name, "collections"
    admin.delete_resources()  # all of a kind: the first click only asks, naming how many of whose
    assert admin.error.value == "" and call(instance, h, "GET", "api/collections/notes")["documents"] == 3
    assert admin.resource_delete.button.description == f"Confirm: delete the 1 collection of {name}"
    admin.resource_kind.value = "presets"  # the form changed: the question is forgotten, nothing deleted
    assert admin.resource_delete.button.description == "Delete" and admin.resource_delete.pending is None
    admin.resource_kind.value = "collections"
    admin.delete_resources()
    admin.delete_resources()  # the second click deletes
    assert admin.error.value == "" and "Deleted 1 collections" in admin.notice.value
    assert call(instance, h, "GET", "api/collections") == {"collections": []}
    assert admin.resource_delete.button.description == "Delete"

    panel.delete_preset("brief")  # what the preset's Delete button calls
    assert call(instance, h, "GET", "api/presets") == {"presets": []}
    assert "No presets." in panel.preset_rows.children[0].value


def test_account_panel_presets_carry_parameters(hub, instance):
    """Temperature, max_tokens and top_p set in the AccountPanel's form are stored with the preset, shown in its
    row, and apply in chat; a value the service refuses shows its 400 message in the panel, and nothing is made."""
    from kernel_ext.service_api import InferenceClient
    from widgets import AccountPanel

    _, h, token = user(hub, "resparam")
    panel = AccountPanel(InferenceClient(instance.url, token))
    fields = panel.preset_parameters
    assert panel.error.value == "" and set(fields) == {"temperature", "max_tokens", "top_p"}
    panel.preset_name.value, panel.preset_model.value = "short", "tiny-chat"
    fields["temperature"].value, fields["max_tokens"].value = "0", " 3 "  # top_p left empty: not set
    panel.create_preset()
    assert panel.error.value == ""
    assert call(instance, h, "GET", "api/presets/short")["parameters"] == {"temperature": 0, "max_tokens": 3}
    row = panel.preset_rows.children[0].children[0].value
    assert "temperature=0.0" in row and "max_tokens=3" in row and "top_p" not in row
    assert all(field.value == "" for field in fields.values())  # the next preset starts with none
    client = openai.OpenAI(base_url=instance.url + "v1", api_key=token, max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="preset:short", messages=[{"role": "user", "content": "hi"}])
    client.close()
    assert answer.model == "tiny-chat" and answer.usage.completion_tokens <= 3

    panel.preset_name.value, fields["temperature"].value = "hot", "9"  # out of range: the service's 400
    panel.create_preset()
    assert "&#x27;temperature&#x27; must be between 0 and 2, got 9.0." in panel.error.value  # (escaped in HTML)
    call(instance, h, "GET", "api/presets/hot", status=404)
    assert fields["temperature"].value == "9" and panel.preset_name.value == "hot"  # kept, to be corrected
    fields["temperature"].value, fields["max_tokens"].value = "", "many"  # not a number: refused in the panel
    panel.create_preset()
    assert "max_tokens must be a whole number" in panel.error.value
    fields["max_tokens"].value, fields["top_p"].value = "", "0.5"
    panel.create_preset()
    assert panel.error.value == "" and call(instance, h, "GET", "api/presets/hot")["parameters"] == {"top_p": 0.5}
    assert [p["name"] for p in call(instance, h, "GET", "api/presets")["presets"]] == ["hot", "short"]


def test_account_page_in_chromium(hub, page):
    """The account page's presets and collections in a real browser: create, add, search, delete by clicking."""
    instance = hub.instances["sqlite"]  # the Hub-managed service, as deployed
    name, h, _ = user(hub, "respage")
    problems = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(f"{hub.url}/hub/login?next={quote(urlparse(instance.url).path)}")
    page.fill("#username_input", name)
    page.fill("#password_input", "test-password-1")  # the test Hub's shared password
    page.click("#login_submit")
    page.wait_for_url(instance.url)
    page.locator("#preset-model option[value='tiny-chat']").wait_for(state="attached")  # (the CSP forbids eval)
    page.fill("#preset-name", "brief")
    page.select_option("#preset-model", "tiny-chat")
    page.fill("#preset-prompt", "Answer briefly.")
    page.click("#preset-form button")
    page.locator("#presets tr", has_text="brief").wait_for()
    assert call(instance, h, "GET", "api/presets/brief")["system_prompt"] == "Answer briefly."
    page.fill("#collection-name", "notes")
    page.click("#collection-form button")
    page.locator("#collections tr", has_text="notes").wait_for()
    for title in ("volcanoes", "sourdough", "chess"):
        page.fill("#document-title", title)
        page.fill("#document-text", DOCUMENTS[title])
        page.click("#document-form button")
        expect(page.locator("#document-text")).to_have_value("", timeout=60_000)
    page.locator("#collections tr", has_text="notes").locator("td", has_text="3").first.wait_for()
    page.fill("#search-query", "Can my king swap places with a rook?")
    page.click("#search-form button")
    page.locator("#results tr").first.wait_for()
    first = page.locator("#results tr").first.text_content()
    assert "chess" in first, first
    page.locator("#presets tr", has_text="brief").get_by_role("button", name="Delete").click()
    expect(page.locator("#presets tr", has_text="brief")).to_have_count(0)
    assert call(instance, h, "GET", "api/presets") == {"presets": []}
    assert page.text_content("#error") == "" and problems == []
    screenshot(page, "account-page-resources")
