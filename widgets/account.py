"""`AccountPanel`: who I am, what I may use and why, my keys, my usage and what is left of my quota.

Every button calls a method of the panel (`create_key`, `revoke_key`, `dismiss_secret`, `refresh`), so a test
calls exactly what a click calls. Data comes only through `kernel_ext.service_api.InferenceClient`.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from collections import defaultdict

import ipywidgets as w

from kernel_ext.service_api import InferenceClient, InferenceError

from . import style

QUOTA_WINDOWS = ("tokens_per_day", "tokens_per_month", "requests_per_minute")
MAX_CHART_DAYS = 92  # a bar per day stays readable up to about a quarter
# The generation parameters a preset's form sets (the service takes a few more: `update_preset` sends any).
PRESET_PARAMETERS = (("temperature", float), ("max_tokens", int), ("top_p", float))


def optional_number(text: str, label: str, kind: type[int] | type[float] = int) -> float | int | None:
    """A number field of a form (`label`: its name in the form): empty means not set (None); else an `int` or a
    finite `float`."""
    text = text.strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{label} must be {what}, or empty.")
    return value


def allowed_names(entries: dict) -> list[str]:
    """The features or models an effective-permissions answer allows: what a key for that user may be narrowed to."""
    return [name for name, decision in entries.items() if decision["allowed"]]


def permissions_html(perms: dict) -> str:
    """Features and models with the answer and where it came from (a user grant, a group, a Hub role...)."""
    def rows(kind: str, entries: dict):
        return [(kind, name, style.allowed(d["allowed"]), d["source"], d.get("via", "")) for name, d in entries]

    entries = rows("feature", perms["features"].items()) + rows("model", perms["models"].items())
    if "other_models" in perms:
        entries += rows("model", [("* (any other)", perms["other_models"])])
    return style.table(("kind", "name", "", "source", "via"), entries, raw=(2,))


def usage_html(report: dict) -> str:
    """A usage report summed per group (model, user...) over its whole range."""
    sums: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    for r in report["rows"]:
        for count in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            sums[r["group"] or "-"][count] += r[count]
    rows = [(g, s["requests"], s["prompt_tokens"], s["completion_tokens"], s["total_tokens"])
            for g, s in sorted(sums.items())]
    title = style.note(f"{report['since'][:10]} to {report['until'][:10]}, by {report['group_by']}")
    return title + usage_chart(report) + style.table(
        (report["group_by"], "requests", "prompt", "completion", "total tokens"), rows)


def usage_chart(report: dict, *, max_series: int = len(style.SERIES_COLOURS)) -> str:
    """Total tokens per day of a daily report, stacked by group (the biggest `max_series`, the rest merged);
    nothing when there is no usage or the report is not by day."""
    if report.get("bucket", "day") != "day" or not report["rows"]:
        return ""
    last = dt.date.fromisoformat(report["until"][:10])
    first = max(dt.date.fromisoformat(report["since"][:10]), last - dt.timedelta(days=MAX_CHART_DAYS - 1))
    days = [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
    where = {day: i for i, day in enumerate(days)}
    totals: dict[str, int] = defaultdict(int)
    for r in report["rows"]:
        totals[r["group"] or "-"] += r["total_tokens"]
    ranked = sorted((g for g in totals if totals[g]), key=lambda g: (-totals[g], g))  # no tokens: no bar
    if not ranked:
        return ""
    kept = set(ranked[:max_series] if len(ranked) <= max_series else ranked[:max_series - 1])
    series: dict[str, list[int]] = {g: [0] * len(days) for g in ranked if g in kept}
    for r in report["rows"]:
        i = where.get(str(r["bucket"])[:10])
        group = r["group"] or "-"
        if i is not None and r["total_tokens"]:
            series.setdefault(group if group in kept else style.OTHERS, [0] * len(days))[i] += r["total_tokens"]
    labels = [day[5:] for day in days]  # MM-DD
    return style.stacked_bars(labels, series, unit="tokens",
                              caption=f"Tokens per day, {days[0]} to {days[-1]}, by {report['group_by']}")


def quota_html(quota: dict) -> str:
    def limit(v):
        return "unlimited" if v is None else v

    rows = [(name.replace("_", " "), limit(q["limit"]), q["used"], limit(q["remaining"]), q["resets_at"] or "",
             q["source"]) for name, q in ((n, quota["limits"][n]) for n in QUOTA_WINDOWS)]
    return style.table(("limit", "", "used", "remaining", "resets", "source"), rows)


def key_label(key: dict) -> str:
    narrowed = ", ".join((key.get("features") or []) + (key.get("models") or [])) or "everything its owner may use"
    parts = [f"<b>{html.escape(key['name'])}</b> <code>{html.escape(key['prefix'])}</code>", f"for {narrowed}",
             f"expires {key['expires_at'] or 'never'}", f"last used {key['last_used'] or 'never'}"]
    if key.get("created_by"):
        parts.append(f"issued by {key['created_by']}")
    return " · ".join(parts[:1] + [html.escape(p) for p in parts[1:]])


def key_rows(keys: list[dict], revoke) -> list[w.Widget]:
    """One line per key with its own Revoke button, which calls `revoke(key_id)`."""
    rows = []
    for key in keys:
        button = w.Button(description="Revoke", button_style="danger", layout=style.button())
        button.on_click(lambda _b, key_id=key["id"]: revoke(key_id))
        rows.append(w.HBox([w.HTML(key_label(key)), button], layout=style.row()))
    return rows or [w.HTML(style.note("No keys."))]


def resource_rows(items: list[dict], label, delete, empty: str) -> list[w.Widget]:
    """One line per preset or collection with its own Delete button, which calls `delete(name)`."""
    rows = []
    for item in items:
        button = w.Button(description="Delete", button_style="danger", layout=style.button())
        button.on_click(lambda _b, name=item["name"]: delete(name))
        rows.append(w.HBox([w.HTML(label(item)), button], layout=style.row()))
    return rows or [w.HTML(style.note(empty))]


def parameters_text(parameters: dict) -> str:
    """A preset's generation parameters on one line (`temperature=0.2, max_tokens=64`), or that it sets none."""
    return ", ".join(f"{name}={json.dumps(value)}" for name, value in parameters.items()) or "default parameters"


def preset_label(preset: dict) -> str:
    prompt = preset["system_prompt"]
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return (f"<b>{html.escape(preset['name'])}</b> <code>preset:{html.escape(preset['name'])}</code> · "
            f"{html.escape(preset['model'])} · {html.escape(prompt or 'no system prompt')} · "
            f"{html.escape(parameters_text(preset.get('parameters') or {}))}")


def collection_label(collection: dict) -> str:
    return (f"<b>{html.escape(collection['name'])}</b> · {collection['documents']} documents, "
            f"{collection['chunks']} chunks · {html.escape(collection['embedding_model'])}")


def results_html(results: list[dict]) -> str:
    rows = [(f"{r['score']:.3f}", r["document"]["title"] or f"#{r['document']['id']}", r["text"]) for r in results]
    return style.table(("score", "document", "text"), rows)


class KeyScope(w.HBox):
    """A new key's "Only features" and "Only models" lists (then `more`, e.g. the form's button), offering what the
    key's owner may use: `offer` takes an effective-permissions answer (the caller's own in AccountPanel, the chosen
    user's in AdminPanel). Nothing picked: the key may do everything its owner may."""

    def __init__(self, *more: w.Widget):
        self.features = w.SelectMultiple(description="Only features", style=style.describe(), layout=style.choices())
        self.models = w.SelectMultiple(description="Only models", style=style.describe(), layout=style.choices())
        super().__init__([self.features, self.models, *more], layout=style.row())

    def offer(self, permissions: dict) -> None:
        self.features.options = allowed_names(permissions["features"])
        self.models.options = allowed_names(permissions["models"])

    def clear(self) -> None:
        self.features.value = self.models.value = ()


class AccountPanel(style.Panel):
    """The account page of the service, in a notebook. `client`: default, the kernel's own (from_environment)."""

    def __init__(self, client: InferenceClient | None = None):
        self.client = client
        self.me: dict = {}
        self.secret: str | None = None  # the newest key's secret, until dismissed: it is never fetched again
        self.identity = w.HTML()
        self.permissions = w.HTML()
        self.key_name = w.Text(description="Name", placeholder="laptop", style=style.describe(), layout=style.field())
        self.key_expiry = w.BoundedIntText(value=0, min=0, max=36500, description="Expires (days)",
                                           style=style.describe(), layout=style.field())
        self.key_scope = KeyScope()
        self.create_button = w.Button(description="Create key", button_style="primary", layout=style.button())
        self.create_button.on_click(self.create_key)
        self.secret_view = w.HTML(layout=style.hidden())
        self.dismiss_button = w.Button(description="Done, I copied it", layout=style.hidden())
        self.dismiss_button.on_click(self.dismiss_secret)
        self.key_rows = w.VBox(layout=style.column())
        self.keys_section = w.VBox([
            w.HTML(style.heading("Your keys")),
            self.key_rows,
            w.HTML(style.heading("New key") + style.note(
                "Expires 0: never. Pick no feature or model to let the key do everything you may.")),
            w.HBox([self.key_name, self.key_expiry], layout=style.row()),
            self.key_scope,
            self.create_button,
            self.secret_view,
            self.dismiss_button,
        ], layout=style.column())
        self.resources_section = self._resources_section()
        self.usage = w.HTML()
        self.quota = w.HTML()
        self.refresh_button = w.Button(description="Refresh", icon="refresh", layout=style.button())
        self.refresh_button.on_click(self.refresh)
        super().__init__("Inference account", [
            self.identity,
            w.HTML(style.heading("What you may use")), self.permissions,
            self.keys_section,
            self.resources_section,
            w.HTML(style.heading("Usage, last 30 days")), self.usage,
            w.HTML(style.heading("Quota")), self.quota,
            self.refresh_button,
        ])
        self.refresh()

    # -- actions (what the buttons call) ---------------------------------------------------------------------

    @style.action
    def refresh(self, _button=None) -> None:
        if self.client is None:
            self.client = InferenceClient.from_environment()
        self._load()

    @style.action
    def create_key(self, _button=None) -> None:
        """Create a key from the form; its secret is shown once, until dismissed or the next key."""
        name = self.key_name.value.strip()
        if not name:
            raise ValueError("Give the key a name (where you will use it, e.g. 'laptop').")
        made = self.client.create_key(name, self.key_expiry.value or None, self.key_scope.features.value,
                                      self.key_scope.models.value)
        self.secret = made["key"]
        self.key_name.value = ""
        self._show_secret()
        self._load_keys()

    def dismiss_secret(self, _button=None) -> None:
        self.secret = None
        self._show_secret()

    @style.action
    def revoke_key(self, key_id: int) -> None:
        self.client.revoke_key(key_id)
        self._load_keys()

    @style.action
    def create_preset(self, _button=None) -> None:
        """A preset from the form; an empty parameter is not set (the model's default, or the request's, applies)."""
        name = self.preset_name.value.strip()
        if not name or not self.preset_model.value:
            raise ValueError("Give the preset a name and pick a model.")
        numbers = {p: optional_number(self.preset_parameters[p].value, p, kind) for p, kind in PRESET_PARAMETERS}
        parameters = {p: value for p, value in numbers.items() if value is not None}
        self.client.create_preset(name, self.preset_model.value, self.preset_prompt.value, parameters)
        self.preset_name.value = self.preset_prompt.value = ""
        for field in self.preset_parameters.values():
            field.value = ""
        self._load_resources()

    @style.action
    def delete_preset(self, name: str) -> None:
        self.client.delete_preset(name)
        self._load_resources()

    @style.action
    def create_collection(self, _button=None) -> None:
        name = self.collection_name.value.strip()
        if not name:
            raise ValueError("Give the collection a name.")
        self.client.create_collection(name)
        self.collection_name.value = ""
        self._load_resources()
        self.collection_pick.value = name

    @style.action
    def delete_collection(self, name: str) -> None:
        self.client.delete_collection(name)
        self._load_resources()

    @style.action
    def add_document(self, _button=None) -> None:
        """The text in the document box, into the picked collection (chunked and embedded by the service)."""
        if not self.collection_pick.value:
            raise ValueError("Create a collection first.")
        text = self.document_text.value
        if not text.strip():
            raise ValueError("Paste the document's text first.")
        self.client.add_documents(self.collection_pick.value, [{"text": text, "title": self.document_title.value}])
        self.document_text.value = self.document_title.value = ""
        self._load_resources()

    @style.action
    def search(self, _button=None) -> None:
        if not self.collection_pick.value:
            raise ValueError("Create a collection first.")
        if not self.search_query.value.strip():
            raise ValueError("Type what to search for.")
        self.search_results.value = results_html(
            self.client.search(self.collection_pick.value, self.search_query.value, self.search_top_k.value))

    # -- loading ---------------------------------------------------------------------------------------------

    def _load(self) -> None:
        self.me = me = self.client.me()
        no_auth = me["authenticated_via"] == "none"
        facts = [("name", me["name"]), ("role", me["role"]), ("status", me.get("status", "")),
                 ("groups", ", ".join(me["groups"]) or "none"), ("signed in with", me["authenticated_via"])]
        if me.get("acting_admin"):
            facts.append(("viewed by", me["acting_admin"]))
        self.identity.value = style.table(("", ""), facts) + (style.note(
            "This service runs without authentication: there are no users or keys to manage.") if no_auth else "")
        perms = self.client.my_permissions()
        self.permissions.value = permissions_html(perms)
        self.keys_section.layout.display = "none" if no_auth else None
        if not no_auth:
            self.key_scope.offer(perms)
            self._load_keys()
        self.resources_section.layout.display = "none" if no_auth or not perms["features"].get(
            "resources", {}).get("allowed") else None
        if self.resources_section.layout.display is None:
            self.preset_model.options = [m["id"] for m in self.client.models() if m.get("task") == "chat"]
            self._load_resources()
        self._section(self.usage, lambda: usage_html(self.client.usage(group_by="model", bucket="day")))
        self._section(self.quota, lambda: quota_html(self.client.quota()))

    def _resources_section(self) -> w.VBox:
        """Presets (a model, a system prompt, generation parameters; used as `preset:<name>`) and knowledge
        collections."""
        self.preset_rows = w.VBox(layout=style.column())
        self.preset_name = w.Text(description="Name", placeholder="brief", style=style.describe(),
                                  layout=style.field())
        self.preset_model = w.Dropdown(description="Model", style=style.describe(), layout=style.field())
        self.preset_prompt = w.Textarea(description="System prompt", style=style.describe(), layout=style.field())
        self.preset_parameters = {p: w.Text(description=p, placeholder="not set", style=style.describe(),
                                            layout=style.field()) for p, _kind in PRESET_PARAMETERS}
        self.preset_button = w.Button(description="Create preset", button_style="primary", layout=style.button())
        self.preset_button.on_click(self.create_preset)
        self.collection_rows = w.VBox(layout=style.column())
        self.collection_name = w.Text(description="Name", placeholder="notes", style=style.describe(),
                                      layout=style.field())
        self.collection_button = w.Button(description="Create collection", button_style="primary",
                                          layout=style.button())
        self.collection_button.on_click(self.create_collection)
        self.collection_pick = w.Dropdown(description="Collection", style=style.describe(), layout=style.field())
        self.document_title = w.Text(description="Title", style=style.describe(), layout=style.field())
        self.document_text = w.Textarea(description="Document", style=style.describe(), layout=style.field())
        self.document_button = w.Button(description="Add document", layout=style.button())
        self.document_button.on_click(self.add_document)
        self.search_query = w.Text(description="Search", placeholder="what to look for", style=style.describe(),
                                   layout=style.field())
        self.search_top_k = w.BoundedIntText(value=5, min=1, max=50, description="Results", style=style.describe(),
                                             layout=style.field())
        self.search_button = w.Button(description="Search", layout=style.button())
        self.search_button.on_click(self.search)
        self.search_results = w.HTML()
        return w.VBox([
            w.HTML(style.heading("Your presets") + style.note(
                "Use one in chat as model \"preset:<name>\": its model, system prompt and parameters apply.")),
            self.preset_rows,
            w.HBox([self.preset_name, self.preset_model], layout=style.row()),
            w.HBox(list(self.preset_parameters.values()), layout=style.row()),
            w.HTML(style.note("Empty: not set (the model's default applies; a request's own value always wins).")),
            self.preset_prompt, self.preset_button,
            w.HTML(style.heading("Your knowledge collections")), self.collection_rows,
            w.HBox([self.collection_name, self.collection_button], layout=style.row()),
            self.collection_pick,
            w.HBox([self.document_title, self.document_button], layout=style.row()), self.document_text,
            w.HBox([self.search_query, self.search_top_k, self.search_button], layout=style.row()),
            self.search_results,
        ], layout=style.column())

    def _load_resources(self) -> None:
        self.preset_rows.children = resource_rows(self.client.presets(), preset_label, self.delete_preset,
                                                  "No presets.")
        collections = self.client.collections()
        self.collection_rows.children = resource_rows(collections, collection_label, self.delete_collection,
                                                      "No collections.")
        picked = self.collection_pick.value
        self.collection_pick.options = [c["name"] for c in collections]
        if picked in self.collection_pick.options:
            self.collection_pick.value = picked

    def _load_keys(self) -> None:
        self.key_rows.children = key_rows(self.client.keys(), self.revoke_key)

    @staticmethod
    def _section(view: w.HTML, render) -> None:
        """A part the caller may not see (a feature off) says why in place, without hiding the rest."""
        try:
            view.value = render()
        except InferenceError as e:
            view.value = style.note(e.message)

    def _show_secret(self) -> None:
        shown = self.secret is not None
        self.secret_view.value = style.secret_html(self.secret) if shown else ""
        self.secret_view.layout.display = None if shown else "none"
        self.dismiss_button.layout.display = None if shown else "none"
