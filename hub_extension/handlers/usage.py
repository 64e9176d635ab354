"""`GET /api/usage` (the caller's own usage) and `GET /api/admin/usage` (everyone's): JSON, or CSV on request.

Thin: the arguments are checked by `usage.parse_report_query` (a 400 for anything off, as for the CLI) and the
numbers come from `usage.UsageReports`, which reads the hourly rollups.
"""

from __future__ import annotations

import datetime as dt

from ..errors import BadRequest, Forbidden
from ..usage import UsageReports, parse_report_query, to_csv, totals
from .base import APIHandler, Auth

REPORT_ARGS = ("bucket", "group_by", "since", "until")


def _iso(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


class UsageHandler(APIHandler):
    """`GET /api/usage?bucket=&group_by=&since=&until=&format=`: the caller's own usage. Through a key, its
    owner's; while an admin views as a user, that user's."""

    async def get(self) -> None:
        if not self.services.permissions.allowed(self.identity, "usage"):
            raise Forbidden("You may not see usage (feature 'usage').")
        if self.get_query_arguments("user"):
            raise BadRequest("'user' is for administrators (/api/admin/usage).", param="user")
        query = parse_report_query(self.report_args())
        if query["group_by"] == "user":
            raise BadRequest("'group_by' must be one of model, key, endpoint or none.", param="group_by")
        await self.report({**query, "users": [self.identity.name]}, filename="usage")

    def report_args(self) -> dict[str, str | None]:
        return {name: self.get_query_argument(name, None) for name in REPORT_ARGS}

    async def report(self, query: dict, filename: str) -> None:
        """JSON, or CSV for `format=csv` or `Accept: text/csv` (an explicit `format` wins)."""
        output = self.get_query_argument("format", None)
        if output not in (None, "json", "csv"):
            raise BadRequest("'format' must be json or csv.", param="format")
        rows = await UsageReports(self.services.db).query(**query)
        if output == "csv" or (output is None and "text/csv" in self.request.headers.get("Accept", "")):
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", f'attachment; filename="{filename}-{query["bucket"]}.csv"')
            self.finish(to_csv(rows))
            return
        self.write_json({
            "bucket": query["bucket"],
            "group_by": query["group_by"],
            "since": _iso(query["since"]),
            "until": _iso(query["until"]),
            "rows": rows,
            "totals": totals(rows),
        })


class AdminUsageHandler(UsageHandler):
    """`GET /api/admin/usage`: everyone's usage, also `group_by=user` and `user=` (repeatable or comma-separated)."""

    auth = Auth.ADMIN

    async def get(self) -> None:
        args = {**self.report_args(), "user": ",".join(self.get_query_arguments("user"))}
        await self.report(parse_report_query(args), filename="usage-all")


routes = [(r"/api/usage", UsageHandler), (r"/api/admin/usage", AdminUsageHandler)]
