"""`AdminPanel`: users (search, filters, status, password reset), grants per user and group, a user's keys (issue,
narrowed or not; revoke one or all), the audit log, view as a user, usage by user and model over a date range,
quotas (a user's, a group's, the default), invitations, and everyone's presets and collections; for the service's
administrators only.

As in `AccountPanel`, every button calls a method of the panel, and data comes only through the client. An action
that destroys many things at once (all of a user's keys, all of their presets or collections) takes two clicks: the
first says how many would go (`ConfirmButton`), the second does it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Hashable

import ipywidgets as w

from kernel_ext.service_api import QUOTA_KINDS, InferenceClient

from . import style
from .account import (
    MAX_CHART_DAYS,
    AccountPanel,
    KeyScope,
    key_rows,
    optional_number,
    parameters_text,
    permissions_html,
    usage_html,
)

STATUSES = (("any", ""), ("active", "active"), ("pending", "pending"), ("disabled", "disabled"))
ROLES = (("any", ""), ("admin", "admin"), ("user", "user"))
LAST_SEEN = (("any time", None), ("in the last day", 1), ("in the last 7 days", 7), ("in the last 30 days", 30),
             ("never", 0))
STATUS_ACTIONS = ("approve", "deny", "disable", "enable")
GRANT_VALUES = (("allow", True), ("deny", False), ("clear", None))
QUOTA_FIELDS = ("tokens_per_day", "tokens_per_month", "requests_per_minute", "weight")
DEFAULT_USAGE_DAYS = 30  # what the service reports when no `since` is given
TABS = ("Users", "Grants", "Keys", "Audit", "Usage", "Quotas", "Invites", "Resources")


def last_seen(user: dict) -> dt.datetime | None:
    """When the user last used the service (or, never having used it, the Hub), if ever."""
    seen = user.get("last_seen") or user.get("hub_last_activity")
    return dt.datetime.fromisoformat(seen.replace("Z", "+00:00")) if seen else None


def seen_within(user: dict, days: int | None, now: dt.datetime) -> bool:
    """`days` None: anyone; 0: never seen; else seen in the last `days` days."""
    seen = last_seen(user)
    if days is None:
        return True
    if days == 0:
        return seen is None
    return seen is not None and now - seen.astimezone(dt.UTC) <= dt.timedelta(days=days)


def usage_cells(user: dict) -> tuple:
    """Requests and tokens of the last 30 days ("" from a service without metering)."""
    usage = user.get("usage_30d")
    return (usage["requests"], f"{usage['total_tokens']:,}") if usage else ("", "")


def usage_query(since: dt.date | None, until: dt.date | None, today: dt.date) -> dict:
    """`/api/admin/usage` arguments for whole UTC days from `since` to `until`, both included (empty: the service's
    default, the 30 days up to now). By day while the chart can draw every day (MAX_CHART_DAYS), else by month."""
    last = until or today
    if since and since > last:
        raise ValueError(f"Since ({since}) is after Until ({until or f'today, {today}'}): pick an earlier start.")
    first = since or last - dt.timedelta(days=DEFAULT_USAGE_DAYS)
    return {"since": f"{since.isoformat()}T00:00:00Z" if since else None,
            "until": f"{until.isoformat()}T23:59:59Z" if until else None,
            "bucket": "day" if (last - first).days < MAX_CHART_DAYS else "month"}


def labelled(description: str, widget_class=w.Text, **kwargs) -> w.Widget:
    return widget_class(description=description, style=style.describe(), layout=style.field(), **kwargs)


def action_button(description: str, callback, **kwargs) -> w.Button:
    button = w.Button(description=description, layout=style.button(), **kwargs)
    button.on_click(lambda _b: callback())
    return button


def count_of(n: int, singular: str, plural: str) -> str:
    """What a confirmation names: "all 3 keys", "the 1 key"."""
    return f"all {n} {plural}" if n != 1 else f"the 1 {singular}"


class ConfirmButton(w.HBox):
    """A danger button for an action that destroys many things at once, in two clicks.

    Its callback (a panel method) asks `confirmed(what)`: false on the first click, when the method counts what
    would go and calls `ask(what, question)` (the button then reads `question`, with a Cancel beside it); true on the
    second, when it acts. Anything that changes what would go (another user picked, the form edited, the list
    reloaded) calls `reset()`, so the next click asks again.
    """

    def __init__(self, label: str, callback: Callable[[], object]):
        self.label = label
        self.pending: Hashable | None = None  # what the next click destroys; None: the next click only asks
        self.button = action_button(label, callback, button_style="danger")
        self.cancel = action_button("Cancel", self.reset)
        self.cancel.layout.display = "none"
        super().__init__([self.button, self.cancel], layout=style.row())

    def confirmed(self, what: Hashable) -> bool:
        return self.pending is not None and self.pending == what

    def ask(self, what: Hashable, question: str) -> None:
        self.pending = what
        self.button.description = self.button.tooltip = question
        self.cancel.layout.display = None

    def reset(self) -> None:
        self.pending = None
        self.button.description, self.button.tooltip = self.label, None
        self.cancel.layout.display = "none"


class AdminPanel(style.Panel):
    """Administration in a notebook. `client`: default, the kernel's own (from_environment)."""

    def __init__(self, client: InferenceClient | None = None):
        self.client = client
        self.users_data: list[dict] = []
        self.filtered: list[dict] = []
        self.selected: str | None = None
        self.secret: str | None = None  # the newest issued key's, shown once (the service keeps only a hash)
        self.new_password: str | None = None  # the newest generated password, likewise
        self.view_panel: AccountPanel | None = None
        self.notice = w.HTML()
        self.tabs = w.Tab(children=[self._users_tab(), self._grants_tab(), self._keys_tab(), self._audit_tab(),
                                    self._usage_tab(), self._quotas_tab(), self._invites_tab(),
                                    self._resources_tab()], titles=TABS,
                           layout=style.hidden())
        self.view_box = w.VBox(layout=style.column())
        super().__init__("Inference administration", [self.notice, self.tabs, self.view_box])
        self.refresh()

    # -- the tabs ----------------------------------------------------------------------------------------------

    def _users_tab(self) -> w.Widget:
        self.search = labelled("Search", placeholder="name or group", continuous_update=False)
        self.status_filter = labelled("Status", w.Dropdown, options=STATUSES)
        self.role_filter = labelled("Role", w.Dropdown, options=ROLES)
        self.group_filter = labelled("Group", w.Dropdown, options=[("any", "")])
        self.seen_filter = labelled("Last seen", w.Dropdown, options=LAST_SEEN)
        for control in (self.search, self.status_filter, self.role_filter, self.group_filter, self.seen_filter):
            control.observe(lambda _change: self.apply_filters(), names="value")
        self.users_table = w.HTML()
        self.user_choice = labelled("User", w.Dropdown, options=[])
        self.user_choice.observe(lambda change: change["new"] and self.select_user(change["new"]), names="value")
        self.user_detail = w.HTML()
        self.password_view = w.HTML()
        actions = [action_button(a.capitalize(), lambda a=a: self.set_status(a)) for a in STATUS_ACTIONS]
        actions.append(action_button("View as this user", self.view_as, icon="eye"))
        actions.append(action_button("Reset password", self.reset_password, icon="key"))
        return w.VBox([
            w.HBox([self.search, self.status_filter, self.role_filter], layout=style.row()),
            w.HBox([self.group_filter, self.seen_filter, action_button("Reload", self.refresh, icon="refresh")],
                   layout=style.row()),
            self.users_table,
            w.HBox([self.user_choice, *actions], layout=style.row()),
            self.password_view,
            self.user_detail,
        ], layout=style.column())

    def _grants_tab(self) -> w.Widget:
        self.grant_kind = w.ToggleButtons(options=("user", "group"))
        self.grant_subject = labelled("Name")
        self.grant_target_kind = labelled("Grant on", w.Dropdown, options=("feature", "model"))
        self.grant_target = labelled("Feature/model", w.Combobox, ensure_option=False)
        self.grant_value = labelled("Set to", w.Dropdown, options=GRANT_VALUES)
        self.grants_view = w.HTML()
        return w.VBox([
            w.HBox([self.grant_kind, self.grant_subject, action_button("Show", self.load_grants)],
                   layout=style.row()),
            w.HBox([self.grant_target_kind, self.grant_target, self.grant_value,
                    action_button("Apply", self.set_grant, button_style="primary")], layout=style.row()),
            w.HTML(style.note("'clear' removes the grant, so the next level (group, Hub role, default) decides.")),
            self.grants_view,
        ], layout=style.column())

    def _keys_tab(self) -> w.Widget:
        self.keys_heading = w.HTML(style.note("Pick a user on the Users tab."))
        self.user_key_rows = w.VBox(layout=style.column())
        self.issue_name = labelled("Key name", placeholder="for a job")
        self.issue_expiry = labelled("Expires (days)", w.BoundedIntText, value=0, min=0, max=36500)
        # As in AccountPanel's "New key": the options are what the chosen user may use.
        self.issue_scope = KeyScope(action_button("Issue key", self.issue_key, button_style="primary"))
        self.revoke_all = ConfirmButton("Revoke all keys", self.revoke_all_keys)
        self.secret_view = w.HTML()
        return w.VBox([
            self.keys_heading, self.user_key_rows,
            self.revoke_all,
            w.HTML(style.heading("Issue a key") + style.note(
                "Expires 0: never. Pick no feature or model to let the key do everything the user may.")),
            w.HBox([self.issue_name, self.issue_expiry], layout=style.row()),
            self.issue_scope,
            self.secret_view,
        ], layout=style.column())

    def _audit_tab(self) -> w.Widget:
        self.audit_user = labelled("User")
        self.audit_action = labelled("Action", placeholder="e.g. key.create")
        self.audit_since = labelled("Since", placeholder="2026-01-31T00:00")
        self.audit_limit = labelled("Limit", w.BoundedIntText, value=50, min=1, max=500)
        self.audit_view = w.HTML()
        return w.VBox([
            w.HBox([self.audit_user, self.audit_action], layout=style.row()),
            w.HBox([self.audit_since, self.audit_limit, action_button("Search", self.load_audit)],
                   layout=style.row()),
            self.audit_view,
        ], layout=style.column())

    def _usage_tab(self) -> w.Widget:
        self.usage_group = labelled("By", w.Dropdown, options=("user", "model"))
        self.usage_since = labelled("Since", w.DatePicker)
        self.usage_until = labelled("Until", w.DatePicker)
        self.usage_view = w.HTML()
        return w.VBox([
            w.HBox([self.usage_group, self.usage_since, self.usage_until, action_button("Show", self.load_usage)],
                   layout=style.row()),
            w.HTML(style.note(f"Whole UTC days, both included; empty: the last {DEFAULT_USAGE_DAYS} days up to now.")),
            self.usage_view,
        ], layout=style.column())

    def _quotas_tab(self) -> w.Widget:
        self.quota_kind = w.ToggleButtons(options=QUOTA_KINDS)
        self.quota_subject = labelled("Name")
        self.quota_kind.observe(lambda change: setattr(self.quota_subject, "disabled", change["new"] == "default"),
                                names="value")
        self.quota_fields = {name: labelled(name.replace("_", " ")) for name in QUOTA_FIELDS}
        self.quota_view = w.HTML()
        return w.VBox([
            w.HBox([self.quota_kind, self.quota_subject, action_button("Show", self.load_quota)], layout=style.row()),
            w.HBox(list(self.quota_fields.values()), layout=style.row()),
            w.HTML(style.note("0: unlimited; empty: nothing at this level (the group, the default or the service's "
                              "settings decide). 'default' applies to everyone no user or group limit covers.")),
            action_button("Save limits", self.set_quota, button_style="primary"),
            self.quota_view,
        ], layout=style.column())

    def _invites_tab(self) -> w.Widget:
        self.invite_note = labelled("Note", placeholder="whom it is for")
        self.invite_groups = labelled("Groups", placeholder="comma-separated")
        self.invite_days = labelled("Expires (days)", w.BoundedIntText, value=7, min=1, max=365)
        self.invite_link = w.HTML()
        self.invites_view = w.HTML()
        self.invite_choice = labelled("Invite", w.Dropdown, options=[])
        return w.VBox([
            w.HBox([self.invite_note, self.invite_groups, self.invite_days,
                    action_button("Create invite", self.create_invite, button_style="primary")], layout=style.row()),
            self.invite_link,
            w.HBox([self.invite_choice, action_button("Revoke", self.revoke_invite),
                    action_button("Reload", self.load_invites, icon="refresh")], layout=style.row()),
            self.invites_view,
        ], layout=style.column())

    def _resources_tab(self) -> w.Widget:
        """Everyone's presets and knowledge collections; deleting a user's is audited."""
        self.resources_view = w.HTML()
        self.resource_user = labelled("User")
        self.resource_kind = labelled("Kind", w.Dropdown, options=("presets", "collections"))
        self.resource_name = labelled("Name", placeholder="empty: all of them")
        self.resource_delete = ConfirmButton("Delete", self.delete_resources)
        for control in (self.resource_user, self.resource_kind, self.resource_name):
            control.observe(lambda _change: self.resource_delete.reset(), names="value")
        return w.VBox([
            action_button("Reload", self.load_resources, icon="refresh"),
            self.resources_view,
            w.HBox([self.resource_user, self.resource_kind, self.resource_name, self.resource_delete],
                   layout=style.row()),
            w.HTML(style.note("Deleting all of a user's presets or collections asks first, with how many would go.")),
        ], layout=style.column())

    # -- actions (what the buttons call) ---------------------------------------------------------------------

    @style.action
    def refresh(self) -> None:
        if self.client is None:
            self.client = InferenceClient.from_environment()
        self._load()

    def apply_filters(self) -> None:
        """Filter the loaded users by the search text, status, role, group and last seen (no request)."""
        text, now = self.search.value.strip().lower(), dt.datetime.now(dt.UTC)
        self.filtered = [
            u for u in self.users_data
            if (not text or text in u["name"].lower() or any(text in g.lower() for g in u["groups"]))
            and (not self.status_filter.value or u["status"] == self.status_filter.value)
            and (not self.role_filter.value or u["role"] == self.role_filter.value)
            and (not self.group_filter.value or self.group_filter.value in u["groups"])
            and seen_within(u, self.seen_filter.value, now)
        ]
        self.users_table.value = style.table(
            ("name", "status", "role", "groups", "last seen", "requests (30 d)", "tokens (30 d)"),
            [(u["name"], u["status"] or "never used", u["role"], ", ".join(u["groups"]),
              u["last_seen"] or u["hub_last_activity"] or "never", *usage_cells(u)) for u in self.filtered],
        )
        self.user_choice.options = [("pick a user", None), *((u["name"], u["name"]) for u in self.filtered)]
        self.user_choice.value = self.selected if any(u["name"] == self.selected for u in self.filtered) else None

    @style.action
    def select_user(self, name: str) -> None:
        self.selected = name
        self._forget_secrets()  # another user's new key or password never shows next to this one
        self.grant_kind.value, self.grant_subject.value = "user", name
        self.quota_kind.value, self.quota_subject.value = "user", name
        self._load_user()
        self._show_grants(self.client.grants)

    @style.action
    def set_status(self, action: str) -> None:
        self.client.set_user_status(self._chosen(), action)
        self._load_users()
        self._load_user()

    @style.action
    def view_as(self) -> None:
        """An AccountPanel that sees the service exactly as the chosen user does (audited by the service)."""
        self.view_panel = AccountPanel(self.client.act_as(self._chosen()))
        self.view_box.children = [w.HTML(style.heading(f"Viewing as {self.selected}")), self.view_panel,
                                  action_button("Close", self.close_view)]

    @style.action
    def reset_password(self) -> None:
        """A generated password for the chosen user's local account, shown here once (the service keeps its hash)."""
        name = self._chosen()
        self.new_password = self.client.reset_password(name)["password"]
        self.password_view.value = style.heading(f"New password of {name}") + style.secret_html(self.new_password)

    def close_view(self) -> None:
        self.view_panel, self.view_box.children = None, []

    @style.action
    def load_grants(self) -> None:
        self._show_grants(self.client.grants)

    @style.action
    def set_grant(self) -> None:
        """Allow, deny or clear one feature or model for the user or group in the form."""
        target = self.grant_target.value.strip()
        if not target:
            raise ValueError("Name the feature or model to grant.")
        section = "features" if self.grant_target_kind.value == "feature" else "models"
        self._show_grants(lambda kind, name: self.client.set_grants(kind, name,
                                                                     {section: {target: self.grant_value.value}}))
        if self.grant_kind.value == "user" and self.grant_subject.value.strip() == self.selected:
            self._load_user()

    @style.action
    def issue_key(self) -> None:
        name = self.issue_name.value.strip()
        if not name:
            raise ValueError("Give the key a name.")
        self.secret = self.client.issue_key(self._chosen(), name, self.issue_expiry.value or None,
                                            self.issue_scope.features.value, self.issue_scope.models.value)["key"]
        self.secret_view.value = style.secret_html(self.secret)
        self.issue_name.value = ""
        self.issue_scope.clear()
        self._load_keys()

    @style.action
    def revoke_user_key(self, key_id: int) -> None:
        self.client.revoke_user_key(self._chosen(), key_id)
        self._load_keys()

    @style.action
    def revoke_all_keys(self) -> None:
        """Every key of the chosen user at once (a lost laptop, someone leaving); audited by the service. The first
        click shows the user's keys afresh and asks ("Confirm: revoke all N keys of NAME"), the second revokes."""
        name = self._chosen()
        if not self.revoke_all.confirmed(name):
            count = len(self._load_keys())
            if not count:
                self.notice.value = style.note(f"{name} has no active keys: nothing to revoke.")
                return
            self.revoke_all.ask(name, f"Confirm: revoke {count_of(count, 'key', 'keys')} of {name}")
            return
        revoked = self.client.revoke_user_keys(name)
        self.notice.value = style.note(f"Revoked {revoked} key(s) of {name}.")
        self._load_keys()

    @style.action
    def load_audit(self) -> None:
        events = self.client.audit(user=self.audit_user.value.strip(), action=self.audit_action.value.strip(),
                                   since=self.audit_since.value.strip(), limit=self.audit_limit.value)
        self.audit_view.value = style.table(
            ("time", "actor", "as", "subject", "action", "details"),
            [(e["time"], e["actor"], e["acting_as"] or "", e["subject"], e["action"], e["details"] or "")
             for e in events],
        )

    @style.action
    def load_usage(self) -> None:
        """Usage by user or model over the picked days; a range too long to chart day by day is summed by month."""
        query = usage_query(self.usage_since.value, self.usage_until.value, dt.datetime.now(dt.UTC).date())
        report = self.client.admin_usage(group_by=self.usage_group.value, **query)
        by_month = query["bucket"] == "month"
        self.usage_view.value = (style.note(f"More than {MAX_CHART_DAYS} days: totals only, no chart by day.")
                                 if by_month else "") + usage_html(report)

    @style.action
    def load_quota(self) -> None:
        self._show_quota(self.client.subject_quota)

    @style.action
    def set_quota(self) -> None:
        fields = self.quota_fields  # empty: nothing at this level (null); 0: unlimited
        limits = {f: optional_number(fields[f].value, fields[f].description, float if f == "weight" else int)
                  for f in QUOTA_FIELDS}
        self._show_quota(lambda kind, name: self.client.set_subject_quota(kind, name, limits))

    @style.action
    def create_invite(self) -> None:
        """A new invitation; its link is shown here once (the service keeps only a hash of it)."""
        groups = [g.strip() for g in self.invite_groups.value.split(",") if g.strip()]
        invite = self.client.create_invite(self.invite_days.value, self.invite_note.value.strip(), groups)
        self.invite_link.value = style.secret_html(invite["url"])
        self.invite_note.value = self.invite_groups.value = ""
        self.load_invites()

    @style.action
    def revoke_invite(self) -> None:
        if self.invite_choice.value is None:
            raise ValueError("Pick an active invite.")
        self.client.revoke_invite(self.invite_choice.value)
        self.load_invites()

    @style.action
    def load_invites(self) -> None:
        invites = self.client.invites()
        self.invites_view.value = style.table(
            ("id", "status", "note", "groups", "expires", "used by", "created by"),
            [(i["id"], i["status"], i["note"], ", ".join(i["groups"]), i["expires_at"], i["used_by"] or "",
              i["created_by"]) for i in invites],
        )
        self.invite_choice.options = [("pick one", None), *((f"{i['id']}: {i['note'] or i['prefix']}", i["id"])
                                                           for i in invites if i["status"] == "active")]

    @style.action
    def load_resources(self) -> None:
        self._show_resources()

    @style.action
    def delete_resources(self) -> None:
        """Delete the user's preset or collection named in the form (audited). With no name, all of that kind: the
        first click shows everyone's afresh and asks ("Confirm: delete all N presets of NAME"), the second deletes."""
        user, kind = self._form_name(self.resource_user), self.resource_kind.value
        name = self.resource_name.value.strip() or None
        if name is None and not self.resource_delete.confirmed((user, kind)):
            everyone = self._show_resources()
            count = sum(r["user"] == user for r in everyone[kind])  # from a listing of at most 1000 (the service's)
            self.resource_delete.ask((user, kind), f"Confirm: delete {count_of(count, kind[:-1], kind)} of {user}"
                                     if count else f"Confirm: delete all {kind} of {user} (none listed)")
            return
        deleted = self.client.delete_user_resources(user, kind, name)
        self.notice.value = style.note(f"Deleted {deleted} {kind} of {user}.")
        self.resource_name.value = ""
        self._show_resources()

    # -- loading -----------------------------------------------------------------------------------------------

    def _load(self) -> None:
        me = self.client.me()
        if me["authenticated_via"] == "none":
            self._refuse("This service runs without authentication: there are no users to manage.")
        elif me["role"] != "admin":
            self._refuse(f"This panel is for the service's administrators; {me['name']} is not one. "
                         "Your own account is in widgets.AccountPanel().")
        else:
            self.notice.value = style.note(f"Signed in as {me['name']} (administrator).")
            self.tabs.layout.display = None
            self._load_users()
            self.load_invites()
            self.load_resources()

    def _refuse(self, message: str) -> None:
        self.notice.value = style.note(message)
        self.tabs.layout.display = "none"

    def _load_users(self) -> None:
        self.users_data = self.client.users()
        groups = sorted({g for u in self.users_data for g in u["groups"]})
        self.group_filter.options = [("any", ""), *((g, g) for g in groups)]
        self.apply_filters()

    def _load_user(self) -> None:
        user = self.client.user(self._chosen())
        facts = [("status", user["status"] or "never used the service"), ("role", user["role"]),
                 ("groups", ", ".join(user["groups"]) or "none"), ("Hub roles", ", ".join(user["roles"]) or "none"),
                 ("last seen", user["last_seen"] or "never")]
        perms = user["permissions"]
        self.grant_target.options = (*perms["features"], *perms["models"])
        self.issue_scope.offer(perms)
        self.user_detail.value = (style.heading(user["name"]) + style.table(("", ""), facts)
                                  + style.heading("Effective permissions") + permissions_html(user["permissions"]))
        self._load_keys()

    def _load_keys(self) -> list[dict]:
        """Show the chosen user's active keys, and return them. A pending "revoke all" asks again: what it counted
        may have changed."""
        name = self._chosen()
        keys = self.client.user_keys(name)
        self.revoke_all.reset()
        self.keys_heading.value = style.heading(f"Keys of {name}")
        self.user_key_rows.children = key_rows(keys, self.revoke_user_key)
        return keys

    def _show_resources(self) -> dict:
        """Show everyone's presets and collections, and return them. A pending "delete all" asks again."""
        everyone = self.client.all_resources()
        self.resource_delete.reset()
        self.resources_view.value = (
            style.heading("Presets") + style.table(("user", "name", "model", "system prompt", "parameters"), [
                (p["user"], p["name"], p["model"], p["system_prompt"][:60], parameters_text(p["parameters"]))
                for p in everyone["presets"]])
            + style.heading("Knowledge collections") + style.table(("user", "name", "documents", "chunks"), [
                (c["user"], c["name"], c["documents"], c["chunks"]) for c in everyone["collections"]]))
        return everyone

    def _show_grants(self, call) -> None:
        """`call(kind, name)` returns the grants of the user or group in the form; show them."""
        kind, name = self.grant_kind.value, self._form_name(self.grant_subject)
        grants = call(kind, name)
        rows = [(section[:-1], target, style.allowed(allow))
                for section in ("features", "models") for target, allow in grants[section].items()]
        self.grants_view.value = style.heading(f"Grants of {kind} {name}") + style.table(
            ("kind", "name", ""), rows, raw=(2,))

    def _show_quota(self, call) -> None:
        """`call(kind, name)` returns the quota of the user, group or default in the form; show it."""
        kind = self.quota_kind.value
        name = None if kind == "default" else self._form_name(self.quota_subject)
        quota = call(kind, name)
        rows = [(f.replace("_", " "), "-" if quota.get(f) is None else quota[f]) for f in QUOTA_FIELDS]
        title = "Default limits (everyone)" if kind == "default" else f"Limits of {kind} {name}"
        self.quota_view.value = style.heading(title) + style.table(("limit", "value"), rows)
        for f in QUOTA_FIELDS:
            self.quota_fields[f].value = "" if quota.get(f) is None else str(quota[f])

    def _forget_secrets(self) -> None:
        self.secret = self.new_password = None
        self.secret_view.value = self.password_view.value = ""

    def _chosen(self) -> str:
        if not self.selected:
            raise ValueError("Pick a user first.")
        return self.selected

    @staticmethod
    def _form_name(text: w.Text) -> str:
        name = text.value.strip()
        if not name:
            raise ValueError("Name the user or group.")
        return name
